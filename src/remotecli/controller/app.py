"""The controller's HTTP API: FastAPI routes over the session manager, with auth and errors.

Every ``/api`` route needs the bearer token or the login cookie (401 without); who a request
is, and how wrong credentials are limited, is decided in one place,
:class:`~remotecli.controller.identity.Identity` (the VNC bridge asks the same one); routes
then call the :class:`~remotecli.controller.sessions.SessionManager`'s verbs. The login
URL's routes are in :mod:`remotecli.controller.login`. A session that is not the caller's
answers 404 as if it did not exist. Session ids and provider names are
checked against strict patterns before they reach the store or the filesystem (422).
:func:`error_response` turns a :class:`RemoteCliError` into its HTTP response through the one
mapping, :func:`remotecli.exceptions.http_answer`: ``{"error": kind, "message": ...}`` with the
error's status, as the gateway's own answers are. The app sits behind the gateway on
a private Unix socket, so it believes the gateway's ``X-Forwarded-*`` headers, read with the
gateway's own rule (:mod:`remotecli.forwarding`). The OpenAPI
document is served at ``/api/openapi.json``; there is no browsable docs page (Swagger UI would
load a script from a CDN into our origin).
"""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import prometheus_client
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from remotecli import __version__
from remotecli.auth import LoginRateLimiter, bearer_token, tokens_match
from remotecli.controller import login
from remotecli.controller.events import SessionEvent
from remotecli.controller.identity import ADMIN_USER, Identity
from remotecli.controller.runs_api import runs_router
from remotecli.controller.sessions import LABEL_MAX, SessionManager
from remotecli.controller.store import SessionRecord
from remotecli.exceptions import (
    NotAuthenticated,
    RemoteCliError,
    ServiceUnavailable,
    Unprocessable,
    error_for_status,
    http_answer,
)
from remotecli.forwarding import IPNetwork, forwarded_for, parse_trusted_proxies, resolve_client
from remotecli.logs import get_logger
from remotecli.states import State

log = get_logger("controller.api")

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
PROVIDER_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
DASHBOARD_PATH = login.DASHBOARD_PATH
SSE_KEEPALIVE = 15.0

ProviderName = Annotated[
    str, PathParam(pattern=PROVIDER_PATTERN, description="A provider name (see GET /api/providers)")
]
SessionId = Annotated[
    str, PathParam(pattern=SESSION_ID_PATTERN, description="A session id (1-64 of A-Za-z0-9_-)")
]

# --- models ---------------------------------------------------------------------------------------


class ErrorOut(BaseModel):
    error: str = Field(description="A stable label of the error kind (not_found, conflict, ...)")
    message: str = Field(description="What went wrong and what to do next")


class ProviderOut(BaseModel):
    name: str
    title: str
    command: list[str]
    available: bool
    hint: str | None = Field(description="How to install it, when not available")
    connected: bool = Field(description="You have a kept sign-in for it: sessions start signed in")
    connected_at: datetime | None = Field(description="When its sign-in was first kept")
    updated_at: datetime | None = Field(description="When its kept sign-in last changed")
    preparing: str | None = Field(
        default=None,
        description="What a first session would wait for now (a microVM template being "
        "prepared in the background), in words; null when it starts at once",
    )
    headless: bool = Field(
        default=False, description="It has a headless command: POST /api/runs can ask it"
    )
    signs_in: bool = Field(
        default=False,
        description="It keeps a sign-in (connect it in a session first); false: it needs none",
    )


class CallbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(
        max_length=4096,
        description="The address the browser ended on after signing in: "
        "http://localhost:PORT/..., http://127.0.0.1:PORT/... or http://[::1]:PORT/...",
        examples=["http://localhost:1455/auth/callback?code=abc&state=xyz"],
    )


class CallbackOut(BaseModel):
    status: int = Field(description="The HTTP status the CLI in the session answered with")
    body: str = Field(description="The start of its answer (2 KiB at most), as text")


class CreateSessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str = Field(pattern=PROVIDER_PATTERN, max_length=32, examples=["shell"])
    label: str | None = Field(
        default=None,
        max_length=256,
        description=f"A name to tell it apart in lists (at most {LABEL_MAX} printable characters)",
        examples=["review PR 42"],
    )


class UpdateSessionIn(BaseModel):
    """A merge patch (RFC 7396): a field left out is left as it is."""

    model_config = ConfigDict(extra="forbid")
    label: str | None = Field(
        default=None,
        max_length=256,
        description="The session's new label; null or blank removes it",
    )


class MeOut(BaseModel):
    name: str = Field(description="Who this request is signed in as")
    signed_in_with: str = Field(description="token (Authorization: Bearer) or login (cookie)")


class SessionOut(BaseModel):
    id: str
    owner: str
    provider: str
    label: str | None = Field(description="The name its owner gave it")
    state: State
    reason: str | None = Field(description="Why it failed or stopped, when it did")
    end_cause: str | None = Field(
        description="What ended it, in one word, when known: restart (remote-cli was "
        "restarted), user-removed"
    )
    created_at: datetime
    updated_at: datetime
    ready_at: datetime | None
    vnc_path: str = Field(description="The WebSocket of its RFB stream (add ?ticket=)")
    events_path: str
    viewers: int
    bytes_in: int = Field(description="Bytes viewers sent to the session")
    bytes_out: int = Field(description="Bytes the session sent to viewers")
    host: str | None = Field(
        default=None,
        description="The host it runs (or ran) on, with the cluster driver; null on the "
        "controller's own host",
    )
    open_url: str | None = Field(
        default=None,
        description="The latest link the session asked a browser to open (a sign-in page): "
        "open it in your own browser",
    )


class HostOut(BaseModel):
    name: str = Field(description="The host's name (its --name when it joined)")
    address: str = Field(description="Its IP address in the cluster")
    up: bool = Field(description="Alive in the cluster; false once it is lost")
    slots: int = Field(description="Sessions it offers in all")
    slots_free: int = Field(description="Sessions it would take now")
    sessions: list[str] = Field(description="The ids of this controller's sessions on it")


class ReadyOut(BaseModel):
    status: str = Field(description="ready")
    active_sessions: int | None = Field(
        default=None, description="Sessions not stopped or failed (operators only)"
    )
    sandbox: dict[str, Any] | None = Field(
        default=None, description="What the driver enforces where sessions run (operators only)"
    )
    hosts: list[HostOut] | None = Field(
        default=None,
        description="The hosts sessions run on, as last read (operators only; the cluster "
        "driver only)",
    )


class SessionHealthOut(SessionOut):
    healthy: bool = Field(description="Ready, and its sandbox is watched and running")
    novnc_path: str = Field(description="The original's WebSocket path of the same stream")


class TicketOut(BaseModel):
    ticket: str
    expires_in: float = Field(description="Seconds it stays valid; it works once")
    vnc_path: str = Field(description="The desktop view's WebSocket path with the ticket")
    tty_path: str = Field(description="The text view's WebSocket path with the ticket")


# --- errors ---------------------------------------------------------------------------------------


def error_response(exc: RemoteCliError) -> Response:
    """Return the HTTP response for ``exc`` as :func:`http_answer` maps it."""
    answer = http_answer(exc)
    return Response(answer.body, status_code=answer.status, headers=dict(answer.headers))


def _timestamp(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _session_fields(record: SessionRecord, viewers: int, open_url: str | None) -> dict[str, Any]:
    return {
        "open_url": open_url,
        "id": record.id,
        "owner": record.owner,
        "provider": record.provider,
        "label": record.label,
        "state": record.state,
        "reason": record.reason,
        "end_cause": record.end_cause,
        "created_at": _timestamp(record.created_at),
        "updated_at": _timestamp(record.updated_at),
        "ready_at": _timestamp(record.ready_at),
        "vnc_path": f"/api/sessions/{record.id}/vnc",
        "events_path": f"/api/sessions/{record.id}/events",
        "viewers": viewers,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "host": record.host,
    }


def _sse(event: SessionEvent) -> str:
    return f"event: {event.type}\ndata: {json.dumps(event.to_json())}\n\n"


# --- the app --------------------------------------------------------------------------------------


def client_address(request: Request, trusted: tuple[IPNetwork, ...] = ()) -> str:
    """Return the client's address as the gateway resolved it.

    The gateway in front (the only peer of the private socket) sends ``X-Forwarded-For`` as the
    trusted proxies' chain followed by its own peer; :func:`remotecli.forwarding.resolve_client`
    picks the client, as the gateway itself did.
    """
    peer = request.client.host if request.client else "unknown"
    hops = forwarded_for(request.headers.get("x-forwarded-for"))
    return resolve_client(hops, peer, trusted)


def operations_router(
    manager: SessionManager,
    registry: prometheus_client.CollectorRegistry,
    operator: Callable[[Request], bool],
) -> APIRouter:
    """``/healthz``, ``/readyz`` and ``/metrics``; ``operator`` says who may read the details.

    ``/healthz`` and ``/readyz``'s status are for anyone (load balancers). ``/readyz``'s
    details (active sessions, the sandbox and accelerator, a cluster's hosts) and ``/metrics``
    need ``operator``: on the API's port that is the metrics token or the admin's credentials;
    on the metrics listener (``metrics_listen``) everyone, since its address is the protection.
    """
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Answer while the process serves requests."""
        return {"status": "ok"}

    @router.get("/readyz", responses={200: {"model": ReadyOut}, 503: {"model": ErrorOut}})
    async def readyz(request: Request) -> Response:
        """Answer 200 once sessions were recovered and the store answers; 503 otherwise.

        For the metrics token, the admin or on the metrics listener, it also says how many
        sessions are active and, under ``sandbox``, what isolation and limits the driver
        enforces on this host (the local driver's sandbox, the qemu driver's accelerator);
        with the cluster driver, ``hosts``: each host's name, address, up, slots, free slots
        and this controller's sessions on it, as last read from the cluster.
        """
        if not manager.ready:
            return error_response(ServiceUnavailable("starting up or shutting down"))
        body: dict[str, object] = {"status": "ready"}
        if operator(request):
            body["active_sessions"] = manager.active_count()
            isolation = manager.isolation()
            if isolation is not None:
                body["sandbox"] = isolation
            hosts = manager.hosts()
            if hosts is not None:
                body["hosts"] = [host.to_json() for host in hosts]
        return JSONResponse(body)

    @router.get("/metrics", response_class=PlainTextResponse, responses={401: {"model": ErrorOut}})
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of the gateway, the bridge and the sessions (operators only)."""
        if not operator(request):
            raise NotAuthenticated(
                "/metrics needs `Authorization: Bearer` with REMOTECLI_METRICS_TOKEN or the "
                "admin's token; or scrape the metrics listener (metrics_listen) instead"
            )
        return Response(
            prometheus_client.generate_latest(registry),
            media_type=prometheus_client.CONTENT_TYPE_LATEST,
        )

    return router


def create_operations_app(
    manager: SessionManager, registry: prometheus_client.CollectorRegistry
) -> FastAPI:
    """The app of the metrics listener: operations only, every detail to every client."""
    app = FastAPI(
        title="remote-cli operations",
        version=__version__,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(RemoteCliError)
    async def _remotecli_error(request: Request, exc: RemoteCliError) -> Response:
        return error_response(exc)

    app.include_router(operations_router(manager, registry, lambda request: True))
    return app


def create_app(
    manager: SessionManager,
    identity: Identity,
    *,
    registry: prometheus_client.CollectorRegistry | None = None,
    limiter: LoginRateLimiter | None = None,
    dashboard: bool = True,
) -> FastAPI:
    """Return the controller's FastAPI app: ``identity`` says who a request is, ``manager`` acts.

    ``registry`` is served at ``/metrics`` (pass the one the gateway and bridge use);
    ``limiter`` replaces the failed-credential limiter of ``identity`` (tests pass a smaller
    one); ``dashboard`` includes the browser dashboard's router.
    """
    app = FastAPI(
        title="remote-cli controller",
        version=__version__,
        openapi_url="/api/openapi.json",
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN: never in our origin
        redoc_url=None,
        responses={401: {"model": ErrorOut}},
    )
    if limiter is not None:
        identity.limiter = limiter
    trusted = parse_trusted_proxies(manager.config.trusted_proxies)
    metrics_registry = registry if registry is not None else prometheus_client.REGISTRY

    @app.exception_handler(RemoteCliError)
    async def _remotecli_error(request: Request, exc: RemoteCliError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return error_response(Unprocessable(f"invalid request: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such path {request.url.path}; the API is described at /api/openapi.json"
        headers = tuple((getattr(exc, "headers", None) or {}).items())
        return error_response(error_for_status(exc.status_code, message, headers=headers))

    def client_of(request: Request) -> str:
        return client_address(request, trusted)

    async def current_user(request: Request) -> str:
        return identity.request_user(
            authorization=request.headers.get("authorization"),
            cookie_header=request.headers.get("cookie"),
            client=client_of(request),
        )

    User = Annotated[str, Depends(current_user)]

    def session_out(record: SessionRecord) -> SessionOut:
        return SessionOut(
            **_session_fields(record, manager.viewers(record.id), manager.open_url(record.id))
        )

    @app.get("/api/providers", response_model=list[ProviderOut], tags=["providers"])
    async def list_providers(user: User) -> list[ProviderOut]:
        """List the providers a session can run, whether each is installed, and connected.

        ``connected``: you have a kept sign-in for it, so its sessions start signed in.
        """
        connections = manager.connections(user)
        out = []
        for s in manager.providers():
            connected_at, updated_at = connections.get(s.name, (None, None))
            out.append(
                ProviderOut(
                    name=s.name,
                    title=s.provider.title,
                    command=list(s.provider.command),
                    available=s.available,
                    hint=s.hint,
                    connected=s.name in connections,
                    connected_at=_timestamp(connected_at),
                    updated_at=_timestamp(updated_at),
                    preparing=manager.preparing(s),
                    headless=bool(s.provider.run),
                    signs_in=bool(s.provider.keep),
                )
            )
        return out

    @app.delete(
        "/api/providers/{provider}/connection",
        status_code=204,
        tags=["providers"],
        responses={422: {"model": ErrorOut}},
    )
    async def disconnect_provider(provider: ProviderName, user: User) -> Response:
        """Forget your kept sign-in for a provider; its next sessions start signed out."""
        manager.disconnect(user, provider)
        return Response(status_code=204)

    @app.post(
        "/api/sessions",
        status_code=201,
        response_model=SessionOut,
        tags=["sessions"],
        responses={422: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}},
    )
    async def create_session(body: CreateSessionIn, user: User) -> SessionOut:
        """Create a session running a provider; follow it on its events stream until ready."""
        return session_out(manager.create(user, body.provider, body.label))

    @app.get("/api/sessions", response_model=list[SessionOut], tags=["sessions"])
    async def list_sessions(user: User) -> list[SessionOut]:
        """List your sessions, newest first."""
        return [session_out(r) for r in manager.owned(user)]

    @app.get(
        "/api/sessions/{session_id}",
        response_model=SessionOut,
        tags=["sessions"],
        responses={404: {"model": ErrorOut}},
    )
    async def get_session(session_id: SessionId, user: User) -> SessionOut:
        """Return one of your sessions."""
        return session_out(manager.get(user, session_id))

    @app.patch(
        "/api/sessions/{session_id}",
        response_model=SessionOut,
        tags=["sessions"],
        responses={404: {"model": ErrorOut}, 422: {"model": ErrorOut}},
    )
    async def update_session(
        session_id: SessionId, body: UpdateSessionIn, user: User
    ) -> SessionOut:
        """Rename one of your sessions (its label), whatever its state.

        A merge patch: ``{"label": "x"}`` renames, ``{"label": null}`` removes the label,
        ``{}`` changes nothing.
        """
        if "label" not in body.model_fields_set:
            return session_out(manager.get(user, session_id))
        return session_out(manager.relabel(user, session_id, body.label))

    @app.get("/api/me", response_model=MeOut, tags=["auth"])
    async def me(request: Request, user: User) -> MeOut:
        """Say who you are signed in as (the dashboard's header shows it)."""
        via = "token" if bearer_token(request.headers.get("authorization")) else "login"
        return MeOut(name=user, signed_in_with=via)

    @app.delete(
        "/api/sessions/{session_id}",
        response_model=SessionOut,
        tags=["sessions"],
        responses={404: {"model": ErrorOut}},
    )
    async def delete_session(session_id: SessionId, user: User) -> SessionOut:
        """Stop one of your sessions and remove its processes; returns it once stopped."""
        manager.get(user, session_id)
        return session_out(await manager.stop(session_id, reason="deleted by its owner"))

    @app.post(
        "/api/sessions/{session_id}/hibernate",
        response_model=SessionOut,
        tags=["sessions"],
        responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
    )
    async def hibernate_session(session_id: SessionId, user: User) -> SessionOut:
        """Hibernate one of your sessions now: saved to disk, its process gone (``hibernated``).

        Only a ready session without a viewer, on a driver that can (``qemu``); 409 otherwise.
        A viewer that connects, or ``POST .../resume``, brings it back.
        """
        return session_out(await manager.hibernate_now(user, session_id))

    @app.post(
        "/api/sessions/{session_id}/resume",
        response_model=SessionOut,
        tags=["sessions"],
        responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 502: {"model": ErrorOut}},
    )
    async def resume_session(session_id: SessionId, user: User) -> SessionOut:
        """Resume a hibernated session and return it once ready; a ready one is returned as is.

        Opening a view resumes it too. If the saved state cannot be loaded the session fails
        with the cause, and the driver's error is returned.
        """
        await manager.wake(user, session_id)
        return session_out(manager.get(user, session_id))

    @app.get(
        "/api/sessions/{session_id}/events",
        tags=["sessions"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorOut}},
    )
    async def session_events(session_id: SessionId, user: User) -> StreamingResponse:
        """Stream the session's state changes and progress as Server-Sent Events.

        The first event is the current state; the stream ends after ``stopped`` or ``failed``.
        """
        first, subscription = manager.follow(user, session_id)

        async def stream() -> AsyncIterator[str]:
            try:
                yield _sse(first)
                if first.final:
                    return
                while True:
                    try:
                        event = await asyncio.wait_for(subscription.get(), SSE_KEEPALIVE)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if event is None:
                        return  # too slow a reader; it reconnects and gets the state again
                    yield _sse(event)
                    if event.final:
                        return
            finally:
                subscription.close()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post(
        "/api/sessions/{session_id}/ticket",
        response_model=TicketOut,
        tags=["sessions"],
        responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
    )
    async def create_ticket(session_id: SessionId, user: User) -> TicketOut:
        """Return a single-use ticket (60 s) for one of the session's WebSockets (either view)."""
        ticket, ttl = manager.issue_ticket(user, session_id)
        return TicketOut(
            ticket=ticket,
            expires_in=ttl,
            vnc_path=f"/api/sessions/{session_id}/vnc?ticket={ticket}",
            tty_path=f"/api/sessions/{session_id}/tty?ticket={ticket}",
        )

    @app.post(
        "/api/sessions/{session_id}/callback",
        response_model=CallbackOut,
        tags=["sessions"],
        responses={
            400: {"model": ErrorOut},
            404: {"model": ErrorOut},
            409: {"model": ErrorOut},
            502: {"model": ErrorOut},
            504: {"model": ErrorOut},
        },
    )
    async def relay_callback(session_id: SessionId, body: CallbackIn, user: User) -> CallbackOut:
        """Finish a browser sign-in: GET the pasted localhost address inside the session.

        Only ``localhost``, ``127.0.0.1`` and ``[::1]`` addresses are relayed (400 otherwise),
        and only to the session's own loopback, where its CLI waits for the redirect.
        """
        status, text = await manager.callback(user, session_id, body.url)
        return CallbackOut(status=status, body=text)

    @app.get(
        "/api/auth/session/{session_id}",
        response_model=SessionHealthOut,
        tags=["compatibility"],
        responses={404: {"model": ErrorOut}},
    )
    async def session_health(session_id: SessionId, user: User) -> SessionHealthOut:
        """Return one of your sessions and its health (the original's path)."""
        record = manager.get(user, session_id)
        return SessionHealthOut(
            **_session_fields(record, manager.viewers(record.id), manager.open_url(record.id)),
            healthy=record.state is State.READY and manager.watched(record.id),
            novnc_path=f"/api/auth/session/{record.id}/novnc/websock",
        )

    app.include_router(login.router(identity, client_of))

    app.include_router(runs_router(manager.runs, current_user, ErrorOut))

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(DASHBOARD_PATH, status_code=307)

    def operator(request: Request) -> bool:
        """Whether a request may read /metrics and /readyz's details (see operations_router)."""
        token = bearer_token(request.headers.get("authorization"))
        metrics_token = manager.config.metrics_token
        if token is not None and metrics_token is not None and tokens_match(token, metrics_token):
            return True
        try:
            return current_user_of(request) == ADMIN_USER
        except RemoteCliError:
            return False

    def current_user_of(request: Request) -> str:
        return identity.request_user(
            authorization=request.headers.get("authorization"),
            cookie_header=request.headers.get("cookie"),
            client=client_of(request),
        )

    app.include_router(operations_router(manager, metrics_registry, operator))

    if dashboard:
        from remotecli.dashboard import router

        app.include_router(router())
    return app
