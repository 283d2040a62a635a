"""The run manager: headless runs of a provider's CLI, streamed as they happen.

Theory of operation. :meth:`RunManager.create` checks the prompt and the limits (runs at once
per user and on this host, the user's quota of runs and tokens in the period: 429 with
``Retry-After``, 503 on the host's cap), stores a ``queued`` run and starts two tasks for it: its
*phase* (start and stream: what a cancel, a timeout or a shutdown ends) and the task that waits
for the phase and then settles the run, which nothing cancels. The phase asks the driver for a
fresh sandbox running the provider's headless command
(:meth:`remotecli.drivers.base.Driver.start_run`) with the user's kept sign-in in HOME
(:class:`~remotecli.controller.connect.SignInKeeper`, as a session's), marks the run
``running``, and reads the command's output as it comes: the provider's format parser
(:mod:`remotecli.run_formats`) turns it into events (``text``, ``tool``, ``usage``), which are
numbered and kept in memory (:class:`_Live`) for every reader of the run's event stream. When the
output ends the run is ``done`` (exit status 0, no error in the CLI's own output) or ``failed``
with the cause; a timeout or a cancel ends its sandbox. In every case the sign-in files are read
back and saved (a refresh token rotated by the run is kept) before the driver removes the
sandbox, and the whole output, its events and the tokens reported are stored with the run, so a
finished run's stream is replayed from the store with the same numbers.

What the CLI prints is the sandboxed user's: hostile. The parser bounds every line and event;
here the answer is bounded too (:data:`OUTPUT_MAX` characters, :data:`EVENTS_MAX` events,
:data:`EVENT_BYTES_MAX` bytes of events), and a run past a bound ends ``failed`` with that bound
named. A run whose end cannot be stored with its output is stored ended without it: none stays
``running`` holding a place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from remotecli.config import ControllerConfig
from remotecli.controller.connect import SignInKeeper
from remotecli.controller.store import RunRecord, Store, Usage
from remotecli.drivers.base import Driver, RunOutput, SessionSpec
from remotecli.exceptions import (
    Conflict,
    NotFound,
    RemoteCliError,
    ServiceUnavailable,
    TooManyRequests,
    Unprocessable,
)
from remotecli.logs import get_logger
from remotecli.providers import Catalogue, Provider
from remotecli.quotas import describe_duration
from remotecli.run_formats import TOKENS_MAX, RunEvent, parser_for
from remotecli.runs import (
    ACTIVE_RUN_STATES,
    RunStep,
    check_prompt,
    period_bounds,
    seconds_until,
)

log = get_logger("controller.runs")

OUTPUT_MAX = 1024 * 1024
"""Characters of answer a run may produce; past it the run ends ``failed``."""
EVENTS_MAX = 50_000
"""Events a run may produce (text pieces of one read are one event); past it, ``failed``."""
EVENT_BYTES_MAX = 4 * 1024**2
"""Bytes of JSON a run's events may take together (text and tool inputs); past it, ``failed``."""
CONCURRENT_RETRY = 5
"""The ``Retry-After`` (seconds) of a run refused because the user's runs are all busy."""
RESTART_REASON = "remote-cli was restarted while the run ran; run it again"
SHUTDOWN_REASON = "remote-cli shut down while the run ran; run it again"
CANCEL_REASON = "cancelled by its owner"
REMOVED_REASON = "its user was removed"
RUN_ENV = {"TERM": "dumb", "NO_COLOR": "1"}
"""What a headless command's environment adds: no terminal, so no colours or cursor moves."""

Clock = Callable[[], float]


def new_run_id() -> str:
    """Return a fresh run id: ``run-`` and 16 URL-safe characters (never a session's length)."""
    return "run-" + secrets.token_urlsafe(12)


@dataclass(frozen=True)
class StreamEvent:
    """One event of a run's stream: its number (the SSE ``id``), its name and its data."""

    id: int
    type: str
    data: dict[str, object]

    @property
    def final(self) -> bool:
        return self.type in ("done", "error")


@dataclass
class _Live:
    """A run in progress: its events so far, and who waits for the next."""

    owner: str
    events: list[StreamEvent] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    text_length: int = 0
    tokens: tuple[int, int] | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task[None] | None = None
    """The whole run, from its start to its stored end (never cancelled)."""
    phase: asyncio.Task[tuple[RunStep, str, int | None]] | None = None
    """Its start and stream: what a cancel, a timeout or a shutdown ends."""
    cancel_reason: str | None = None
    event_bytes: int = 0

    def stop(self, reason: str) -> None:
        """End the start-and-stream phase with ``reason``, if it still goes (first reason wins)."""
        if self.phase is not None and not self.phase.done() and self.cancel_reason is None:
            self.cancel_reason = reason
            self.phase.cancel()

    def has_more(self, seen: int) -> bool:
        """Say whether events came after the first ``seen``."""
        return len(self.events) > seen

    async def publish(self, kind: str, data: dict[str, object]) -> None:
        self.events.append(StreamEvent(len(self.events) + 1, kind, data))
        async with self.changed:
            self.changed.notify_all()


class _TooMuchOutput(Exception):
    """The run's answer went past :data:`OUTPUT_MAX` or :data:`EVENTS_MAX`."""


class RunManager:
    """Creates, streams, cancels and settles headless runs; the verbs the API calls.

    Call :meth:`recover` once on start and :meth:`close` on shutdown.
    """

    def __init__(
        self,
        config: ControllerConfig,
        store: Store,
        driver: Driver,
        catalogue: Catalogue,
        keeper: SignInKeeper,
        *,
        clock: Clock = time.time,
        controller_id: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.driver = driver
        self.catalogue = catalogue
        self.keeper = keeper
        self.controller_id = controller_id
        """Recorded on its runs; :meth:`recover` settles only those (None: every run)."""
        self._clock = clock
        self._live: dict[str, _Live] = {}
        self._closing = False

    # --- the verbs -----------------------------------------------------------------------------

    def create(
        self, owner: str, provider: str, prompt: str, timeout_s: float | None = None
    ) -> RunRecord:
        """Store a new run of ``provider`` for ``owner`` and start it in the background.

        Raises Unprocessable (422) for a bad prompt or timeout, or a provider that cannot run
        headless here; TooManyRequests (429, with ``retry_after``) over the user's runs at once
        or quota; ServiceUnavailable (503) over the host's runs at once or while shutting down.
        """
        check_prompt(prompt)
        limit = self.config.run_timeout
        timeout = limit if timeout_s is None else timeout_s
        if not 0 < timeout <= limit:
            raise Unprocessable(
                f"timeout_s must be more than 0 and at most {limit:g} seconds (run_timeout)",
                limit=limit,
            )
        status, argv = self.catalogue.run_command(provider, prompt)
        if self._closing:
            raise ServiceUnavailable("the controller is shutting down; try again in a moment")
        self._check_limits(owner)
        now = self._clock()
        record = self.store.create_run(
            new_run_id(), owner, provider, prompt, timeout, now, controller=self.controller_id
        )
        home_files, base = self.keeper.restore(owner, provider)
        spec = SessionSpec(
            session_id=record.id,
            provider=provider,
            command=argv,
            workdir=self._workdir(record.id),
            env=RUN_ENV,
            home_files=home_files,
            keeps_signin=bool(status.provider.keep),
        )
        live = _Live(owner)
        self._live[record.id] = live
        live.phase = asyncio.create_task(
            self._phase(record, spec, status.provider, base, live), name=f"run-{record.id}"
        )
        live.task = asyncio.create_task(self._drive(record, live))
        log.info("run created", run_id=record.id, owner=owner, provider=provider)
        return record

    def get(self, owner: str, run_id: str) -> RunRecord:
        """Return ``owner``'s run; NotFound (404) for an unknown one or someone else's."""
        record = self.store.run_of(owner, run_id)
        if record is None:
            raise NotFound(f"no run {run_id}; list yours with GET /api/runs", run_id=run_id)
        return record

    def owned(self, owner: str) -> list[RunRecord]:
        """Return ``owner``'s latest runs, newest first."""
        return self.store.runs(owner)

    def output(self, record: RunRecord) -> str:
        """Return the run's answer so far: the stored one once it ended, else what came."""
        live = self._live.get(record.id)
        if live is not None and record.state in ACTIVE_RUN_STATES:
            return "".join(live.text)
        return record.output

    def usage(self, owner: str) -> tuple[float, float, Usage]:
        """Return the current period's start and end, and what ``owner``'s runs used in it."""
        start, end = period_bounds(self.config.quota_period, self._clock())
        return start, end, self.store.usage(owner, start, end)

    async def cancel(self, owner: str, run_id: str) -> RunRecord:
        """Cancel ``owner``'s run if it still runs (its processes end), and return it.

        A run that already ended is returned as it is: cancelling is idempotent.
        """
        record = self.get(owner, run_id)
        live = self._live.get(run_id)
        if record.state not in ACTIVE_RUN_STATES or live is None or live.task is None:
            return record
        live.stop(CANCEL_REASON)
        await asyncio.wait({live.task})
        return self.store.run(run_id)

    async def follow(
        self, owner: str, run_id: str, after: int = 0, *, idle: float = 15.0
    ) -> AsyncIterator[StreamEvent | None]:
        """Yield the run's events numbered above ``after``, as they come, up to the final one.

        Yields None after ``idle`` seconds without an event (the caller's keep-alive). A
        finished run's events come from the store, numbered as they were streamed. Check the
        owner with :meth:`get` first: this raises NotFound only once iterated.
        """
        self.get(owner, run_id)
        live = self._live.get(run_id)
        if live is None:
            for event in self._stored_events(self.store.run(run_id)):
                if event.id > after:
                    yield event
            return
        index = max(0, after)
        while True:
            while index < len(live.events):
                event = live.events[index]
                index += 1
                yield event
                if event.final:
                    return
            try:
                async with asyncio.timeout(idle), live.changed:
                    await live.changed.wait_for(functools.partial(live.has_more, index))
            except TimeoutError:
                yield None

    # --- start and shutdown --------------------------------------------------------------------

    async def end_removed_users(self) -> list[str]:
        """Cancel every run whose owner was removed (``remotecli user remove``); their ids."""
        doomed = []
        for record in self.store.removed_owners_with_runs():
            live = self._live.get(record.id)
            if live is not None and live.task is not None:
                live.stop(REMOVED_REASON)
                doomed.append(live.task)
        if doomed:
            await asyncio.wait(doomed)
        return [r.id for r in self.store.removed_owners_with_runs()]

    async def recover(self) -> None:
        """Settle the runs a previous controller left running: their sandboxes go, they fail."""
        for record in self.store.active_runs(self.controller_id):
            with contextlib.suppress(RemoteCliError, OSError):
                await self.driver.recover(record.id, self._workdir(record.id))
            with contextlib.suppress(RemoteCliError, OSError):
                # A driver whose runs outlive the controller (the cluster's detached actors)
                # found it again: end it.
                await self.driver.stop(record.id)
            self.store.apply_run(record.id, RunStep.FAIL, self._clock(), reason=RESTART_REASON)
            log.info("run settled after a restart", run_id=record.id)

    async def settle_taken(self, record: RunRecord, reason: str) -> None:
        """End a run this controller took over from a silent one (:mod:`.peers`): its sandbox
        or actor goes (the cluster's outlive their controller), and it fails with ``reason``.
        A run that ended meanwhile stays as it ended."""
        with contextlib.suppress(RemoteCliError, OSError):
            await self.driver.stop(record.id)
        with contextlib.suppress(Conflict):
            self.store.apply_run(record.id, RunStep.FAIL, self._clock(), reason=reason)

    async def close(self) -> None:
        """Refuse new runs and end every running one (``failed``: the controller shut down)."""
        self._closing = True
        tasks = []
        for live in self._live.values():
            if live.task is not None and not live.task.done():
                live.stop(SHUTDOWN_REASON)
                tasks.append(live.task)
        if tasks:
            await asyncio.wait(tasks)

    # --- limits ----------------------------------------------------------------------------------

    def _check_limits(self, owner: str) -> None:
        config = self.config
        active = self.store.active_runs()
        mine = sum(1 for r in active if r.owner == owner)
        if mine >= config.max_runs_per_user:
            raise TooManyRequests(
                f"you already have {mine} run(s) going, the limit at once per user "
                f"(max_runs_per_user = {config.max_runs_per_user}); wait for one to end or "
                "cancel it (DELETE /api/runs/{id})",
                limit="max_runs_per_user",
                retry_after=CONCURRENT_RETRY,
            )
        if len(active) >= config.max_runs:
            raise ServiceUnavailable(
                f"this host already runs {len(active)} runs, its limit (max_runs = "
                f"{config.max_runs}); try again in a moment",
                limit="max_runs",
            )
        now = self._clock()
        _, end, used = self.usage(owner)
        retry = seconds_until(end, now)
        period = f"this {config.quota_period} (UTC)"
        when = f"the quota renews in {describe_duration(retry)}"
        if config.runs_per_period and used.runs >= config.runs_per_period:
            raise TooManyRequests(
                f"you have used your {config.runs_per_period} runs of {period} "
                f"(runs_per_period); {when}",
                limit="runs_per_period",
                retry_after=retry,
            )
        if config.tokens_per_period and used.tokens >= config.tokens_per_period:
            raise TooManyRequests(
                f"your runs of {period} used {used.tokens} tokens, the quota is "
                f"{config.tokens_per_period} (tokens_per_period); {when}",
                limit="tokens_per_period",
                retry_after=retry,
            )

    # --- one run -------------------------------------------------------------------------------

    async def _drive(self, record: RunRecord, live: _Live) -> None:
        """Run one command from start to its stored end (see the module's theory).

        Only the first phase, start and stream, can be cancelled (:meth:`cancel` cancels
        ``live.phase``); what follows always runs to its end: the sign-in saved, the sandbox
        removed, the run stored whatever its output, and the run's live state dropped.
        """
        began = time.monotonic()
        assert live.phase is not None
        try:
            await asyncio.wait({live.phase})  # never cancels the phase with this task
            step, reason, code = self._outcome(live, live.phase)
            with contextlib.suppress(RemoteCliError, OSError):
                if reason == REMOVED_REASON:
                    self.keeper.forget(record.id)  # a removed user's sign-in is not kept again
                else:
                    await self.keeper.finish(record.id)  # before the driver removes HOME
            with contextlib.suppress(RemoteCliError, OSError):
                await self.driver.stop(record.id)
            duration = round(time.monotonic() - began, 3)
            if step is RunStep.FINISH:
                await live.publish("done", {"exit_code": code, "duration_s": duration})
            else:
                final: dict[str, object] = {"reason": reason}
                if code is not None:
                    final["exit_code"] = code
                await live.publish("error", final)
            self._store_end(record.id, live, step, reason, code)
            log.info("run ended", run_id=record.id, step=step.value, seconds=duration)
        finally:
            self._live.pop(record.id, None)
            async with live.changed:
                live.changed.notify_all()

    async def _phase(
        self,
        record: RunRecord,
        spec: SessionSpec,
        provider: Provider,
        base: int | None,
        live: _Live,
    ) -> tuple[RunStep, str, int | None]:
        """Start the command and stream its output; return how it ended (step, reason, code)."""
        code = None
        try:
            async with asyncio.timeout(record.timeout_s):
                output = await self.driver.start_run(spec, lambda _: None)
                self.store.apply_run(record.id, RunStep.START, self._clock())
                self.keeper.watch(record.id, record.owner, record.provider, provider.keep, base)
                code, error = await self._stream(live, output, provider.run_format)
        except TimeoutError:
            return (
                RunStep.FAIL,
                f"timed out after {describe_duration(record.timeout_s)} (timeout_s)",
                code,
            )
        except _TooMuchOutput as exc:
            return RunStep.FAIL, str(exc), code
        except RemoteCliError as exc:
            return RunStep.FAIL, exc.message, code
        if code == 0 and error is None:
            return RunStep.FINISH, "", code
        return RunStep.FAIL, _failure(provider.run[0], code, error, output.errors()), code

    def _outcome(
        self, live: _Live, phase: asyncio.Task[tuple[RunStep, str, int | None]]
    ) -> tuple[RunStep, str, int | None]:
        """How the first phase ended: its own answer, a cancel, or (a bug) its exception."""
        if phase.cancelled():
            reason = live.cancel_reason or SHUTDOWN_REASON
            return (RunStep.FAIL if reason == SHUTDOWN_REASON else RunStep.CANCEL), reason, None
        problem = phase.exception()
        if problem is not None:
            log.error("run phase crashed", error=repr(problem))
            return RunStep.FAIL, "remote-cli failed to run it (see its log); run it again", None
        return phase.result()

    def _store_end(
        self, run_id: str, live: _Live, step: RunStep, reason: str, code: int | None
    ) -> None:
        """Store how the run ended with its output and events; if that cannot be stored, at
        least the end (a run must never stay ``running``)."""
        events = json.dumps([[e.type, e.data] for e in live.events], separators=(",", ":"))
        try:
            self.store.apply_run(
                run_id,
                step,
                self._clock(),
                reason=None if step is RunStep.FINISH else reason,
                exit_code=code,
                output="".join(live.text),
                events=events,
                tokens=live.tokens,
            )
        except Conflict:  # another controller ended it while this one was silent: it stays so
            log.warning("run ended elsewhere meanwhile", run_id=run_id)
        except (RemoteCliError, OverflowError, ValueError) as exc:
            log.error("run output not stored", run_id=run_id, error=str(exc))
            self.store.apply_run(
                run_id,
                RunStep.FAIL if step is RunStep.FINISH else step,
                self._clock(),
                reason=reason or f"its output could not be stored: {exc}",
                exit_code=code,
            )

    async def _stream(
        self, live: _Live, output: RunOutput, run_format: str
    ) -> tuple[int, str | None]:
        """Publish the command's output as events until it ends; return (status, CLI's error)."""
        parser = parser_for(run_format)
        while chunk := await output.read():
            await self._publish(live, parser.feed(chunk))
        await self._publish(live, parser.end())
        return await output.wait(), parser.error

    async def _publish(self, live: _Live, events: list[RunEvent]) -> None:
        """Publish one read's events, its text pieces joined; bound the answer."""
        merged: list[RunEvent] = []
        for event in events:
            if event.type == "text" and merged and merged[-1].type == "text":
                text = str(merged[-1].data["text"]) + str(event.data["text"])
                merged[-1] = RunEvent("text", {"text": text})
            else:
                merged.append(event)
        for event in merged:
            if event.type == "text":
                text = str(event.data["text"])
                if not text:
                    continue
                live.text_length += len(text)
                if live.text_length > OUTPUT_MAX:
                    raise _TooMuchOutput(
                        f"the answer passed {OUTPUT_MAX // 1024} KiB, the most a run keeps; "
                        "ask for a shorter one or use a session"
                    )
                live.text.append(text)
            elif event.type == "usage":
                live.tokens = (
                    _count(event.data.get("input_tokens")),
                    _count(event.data.get("output_tokens")),
                )
            live.event_bytes += len(json.dumps(event.data, separators=(",", ":")))
            if len(live.events) >= EVENTS_MAX or live.event_bytes > EVENT_BYTES_MAX:
                raise _TooMuchOutput(
                    f"the run sent more than {EVENTS_MAX} events or "
                    f"{EVENT_BYTES_MAX // 1024**2} MiB of them, the most a run keeps"
                )
            await live.publish(event.type, dict(event.data))

    def _stored_events(self, record: RunRecord) -> list[StreamEvent]:
        try:
            stored = json.loads(record.events or "[]")
        except ValueError:
            stored = []
        events = [
            StreamEvent(i, str(kind), data)
            for i, (kind, data) in enumerate(stored, start=1)
            if isinstance(data, dict)
        ]
        if not events or not events[-1].final:  # ended before anything was stored
            events.append(
                StreamEvent(len(events) + 1, "error", {"reason": record.reason or "unknown"})
            )
        return events

    def _workdir(self, run_id: str) -> Path:
        return self.config.data_dir / "runs" / run_id


def _count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= TOKENS_MAX:
        return value
    return 0


def _failure(program: str, code: int | None, error: str | None, stderr: str) -> str:
    """Say why a run whose command ended failed: its own error, its status, its stderr's end."""
    name = Path(program).name
    parts = []
    if error:
        parts.append(error)
    if code:
        parts.append(f"{name} exited with status {code}")
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    if last and not error:
        parts.append(last[:300])
    return "; ".join(parts) or f"{name} reported an error"
