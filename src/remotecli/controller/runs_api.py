"""The API of headless runs (``/api/runs``, ``/api/usage``) over :class:`RunManager`.

Each route needs the caller (the app's ``current_user`` dependency); a run that is not the
caller's answers 404, as a session does. A run's events are Server-Sent Events (the WHATWG HTML
standard's ``text/event-stream``): each has an ``id`` (its number in the run), an ``event``
name and one line of JSON ``data``; a reconnecting client's ``Last-Event-ID`` resumes after it.
"""

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from remotecli.controller.runs import RunManager, StreamEvent
from remotecli.controller.store import RunRecord
from remotecli.runs import PROMPT_MAX, RunState

RUN_ID_PATTERN = r"^run-[A-Za-z0-9_-]{1,60}$"
PROVIDER_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
SSE_KEEPALIVE = 15.0

RunId = Annotated[str, PathParam(pattern=RUN_ID_PATTERN, description="A run id (run-...)")]


class CreateRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str = Field(pattern=PROVIDER_PATTERN, max_length=32, examples=["shell"])
    prompt: str = Field(
        max_length=PROMPT_MAX,
        description="What the CLI should do; the shell provider runs it as a bash command line",
        examples=["uname -a"],
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds the run may take before it is ended (default and most: the "
        "controller's run_timeout)",
        examples=[600],
    )


class UsageCountOut(BaseModel):
    input_tokens: int
    output_tokens: int


class RunOut(BaseModel):
    id: str
    owner: str
    provider: str
    prompt: str
    state: RunState
    reason: str | None = Field(description="Why it failed or was cancelled, when it was")
    exit_code: int | None = Field(description="The command's exit status, once it exited")
    timeout_s: float
    created_at: datetime
    started_at: datetime | None = Field(description="When its command started")
    ended_at: datetime | None
    output: str = Field(
        description="The answer's text: so far while it runs, whole once ended (in a list of "
        "runs only its first 4,096 characters: get the run for the rest)"
    )
    usage: UsageCountOut | None = Field(description="Tokens, when the CLI reported them")
    events_path: str = Field(description="Its Server-Sent Events stream")


class LimitsOut(BaseModel):
    concurrent_runs: int = Field(description="Runs you may have going at once")
    runs_per_period: int | None = Field(description="Runs per period; null: no quota")
    tokens_per_period: int | None = Field(description="Tokens per period; null: no quota")


class UsageOut(BaseModel):
    period: Literal["month", "week", "day"]
    period_start: datetime
    period_end: datetime = Field(description="When the quota renews")
    runs: int
    input_tokens: int
    output_tokens: int
    limits: LimitsOut


def _timestamp(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _sse(event: StreamEvent) -> str:
    data = json.dumps(event.data, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n"


def _last_event_id(value: str | None) -> int:
    """Read ``Last-Event-ID``: a run's event number; anything else means from the start."""
    text = (value or "").strip()
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        return 0
    return int(text)


def runs_router(
    runs: RunManager,
    current_user: Callable[[Request], Awaitable[str]],
    error_model: type[BaseModel],
) -> APIRouter:
    """Return the routes of headless runs; ``current_user`` says who a request is (401),
    ``error_model`` is the API's error answer (its OpenAPI schema)."""
    router = APIRouter(tags=["runs"])
    ErrorOut = error_model
    User = Annotated[str, Depends(current_user)]

    def run_out(record: RunRecord) -> RunOut:
        tokens = None
        if record.input_tokens is not None and record.output_tokens is not None:
            tokens = UsageCountOut(
                input_tokens=record.input_tokens, output_tokens=record.output_tokens
            )
        return RunOut(
            id=record.id,
            owner=record.owner,
            provider=record.provider,
            prompt=record.prompt,
            state=record.state,
            reason=record.reason,
            exit_code=record.exit_code,
            timeout_s=record.timeout_s,
            created_at=datetime.fromtimestamp(record.created_at, UTC),
            started_at=_timestamp(record.started_at),
            ended_at=_timestamp(record.ended_at),
            output=runs.output(record),
            usage=tokens,
            events_path=f"/api/runs/{record.id}/events",
        )

    @router.post(
        "/api/runs",
        status_code=201,
        response_model=RunOut,
        responses={422: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}},
    )
    async def create_run(body: CreateRunIn, user: User) -> RunOut:
        """Run a provider's CLI headless on a prompt, signed in as you; follow its events.

        It runs in a fresh sandbox that starts with your kept sign-in and saves it back when
        it ends. Over your runs at once or your quota: 429, with ``Retry-After`` and the limit
        named in the message.
        """
        return run_out(runs.create(user, body.provider, body.prompt, body.timeout_s))

    @router.get("/api/runs", response_model=list[RunOut])
    async def list_runs(user: User) -> list[RunOut]:
        """List your latest 100 runs, newest first."""
        return [run_out(r) for r in runs.owned(user)]

    @router.get("/api/runs/{run_id}", response_model=RunOut, responses={404: {"model": ErrorOut}})
    async def get_run(run_id: RunId, user: User) -> RunOut:
        """Return one of your runs: its state and its whole output so far."""
        return run_out(runs.get(user, run_id))

    @router.delete(
        "/api/runs/{run_id}", response_model=RunOut, responses={404: {"model": ErrorOut}}
    )
    async def cancel_run(run_id: RunId, user: User) -> RunOut:
        """Cancel one of your runs (its processes end) and return it once ended; idempotent."""
        return run_out(await runs.cancel(user, run_id))

    @router.get(
        "/api/runs/{run_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorOut}},
    )
    async def run_events(run_id: RunId, request: Request, user: User) -> StreamingResponse:
        """Stream the run's events as Server-Sent Events, from the start or ``Last-Event-ID``.

        ``text`` ``{"text"}`` as the CLI produces it, ``tool`` ``{"name", "input"}``,
        ``usage`` ``{"input_tokens", "output_tokens"}`` (the run's totals so far), then
        ``done`` ``{"exit_code", "duration_s"}`` or ``error`` ``{"reason"}``, and the stream
        ends. A finished run's stream replays its events.
        """
        runs.get(user, run_id)  # 404 before the stream starts
        after = _last_event_id(request.headers.get("last-event-id"))
        events = runs.follow(user, run_id, after, idle=SSE_KEEPALIVE)

        async def stream() -> AsyncIterator[str]:
            async for event in events:
                yield ": keepalive\n\n" if event is None else _sse(event)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get("/api/usage", response_model=UsageOut)
    async def usage(user: User) -> UsageOut:
        """Say what your runs used in the current period, and your limits."""
        start, end, used = runs.usage(user)
        config = runs.config
        return UsageOut(
            period=config.quota_period,  # type: ignore[arg-type]
            period_start=datetime.fromtimestamp(start, UTC),
            period_end=datetime.fromtimestamp(end, UTC),
            runs=used.runs,
            input_tokens=used.input_tokens,
            output_tokens=used.output_tokens,
            limits=LimitsOut(
                concurrent_runs=config.max_runs_per_user,
                runs_per_period=config.runs_per_period or None,
                tokens_per_period=config.tokens_per_period or None,
            ),
        )

    return router
