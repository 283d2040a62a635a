"""The session manager: runs each session's lifecycle through the driver.

Theory of operation. :meth:`SessionManager.create` checks the limits (per user, the host's
cap, the user's fair share of it and the creation rate: :mod:`remotecli.quotas`), stores a
``pending`` session and starts one task per session that drives it: ``start`` → the driver's
``start`` → ``ready`` → the driver's ``wait``. When ``wait`` returns while the session is still
``ready``, the sandbox died by itself: the session becomes ``failed`` with the driver's reason
and its viewers are closed with 1011. :meth:`SessionManager.stop` (a user's DELETE, the
reaper, or the shutdown) cancels that task, closes the viewers with 1000, asks the driver to
stop and records ``stopped``. Every change goes through the store's transition table and is
published as an event. On start, :meth:`SessionManager.recover` settles sessions a previous
controller left active, so nothing stays ``ready`` that is not.

Hibernation. The reaper hibernates a ready session that had no viewer for ``hibernate_after``
(:meth:`SessionManager.hibernate`: the driver saves it to disk and ends its processes; a driver
that cannot says so and the session runs on). A viewer of either view, or ``POST .../resume``,
resumes it (:meth:`SessionManager.wake`): one resume per session at a time, every viewer
waiting for it. The store changes only once the driver is done, so a restart in the middle
finds the session as it was before, and :meth:`SessionManager.recover` keeps a hibernated
session hibernated whatever ``on_shutdown`` says: it has no process to lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import prometheus_client

from remotecli.auth import TicketBook
from remotecli.config import ControllerConfig
from remotecli.controller.connect import SignInKeeper, relay_callback
from remotecli.controller.events import SessionEvent, SessionEvents, Subscription
from remotecli.controller.host_metrics import HostCollector, SessionMetrics
from remotecli.controller.peers import Peers, last_viewed, takeover_reason, watched_elsewhere
from remotecli.controller.runs import RunManager
from remotecli.controller.signins import SignIns
from remotecli.controller.store import SessionRecord, Store
from remotecli.controller.viewers import ViewerCloser
from remotecli.drivers.base import Driver, HostStatus, SessionSpec, TtyEndpoint, VncEndpoint
from remotecli.exceptions import (
    Conflict,
    NotFound,
    RemoteCliError,
    ServiceUnavailable,
    TooManyRequests,
    Unprocessable,
)
from remotecli.logs import get_logger
from remotecli.providers import Catalogue, ProviderStatus
from remotecli.quotas import CreationRate, describe_duration, fair_share
from remotecli.states import Event, State, is_final

log = get_logger("controller.sessions")

RESTART_REASON = "remote-cli was restarted or stopped, which ended this session; start a new one"
"""Why a session ended with the controller (``end_cause`` ``restart``; the dashboard says so)."""

LABEL_MAX = 64
"""Characters a session's label may have."""

STORE_POLL = 1.0
"""Seconds between looks for changes another process made to the store (a removed user, a
stop another controller asked for)."""
REMOTE_STOP_WAIT = 30.0
"""How long a stop asked of another controller is waited for before answering ``stopping``."""

Clock = Callable[[], float]


def clean_label(label: str | None) -> str | None:
    """Return ``label`` trimmed, or None when blank; Unprocessable (422) when unfit to show.

    A label is at most :data:`LABEL_MAX` characters of printable text: no control characters
    (no newlines, escapes or bidirectional overrides that would disguise it in a list).
    """
    if label is None:
        return None
    text = label.strip()
    if not text:
        return None
    if len(text) > LABEL_MAX:
        raise Unprocessable(f"a session label is at most {LABEL_MAX} characters; shorten it")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") for c in text):
        raise Unprocessable(
            "a session label must be printable text: no control, format or separator "
            "characters (newlines, escapes, direction overrides)"
        )
    return text


def new_session_id() -> str:
    """Return a fresh session id (16 URL-safe characters, matching the bridge's path pattern)."""
    return secrets.token_urlsafe(12)


@dataclass
class _Runtime:
    """What the manager knows in memory about one active session."""

    task: asyncio.Task[None] | None = None
    stopping: asyncio.Task[SessionRecord] | None = None
    viewers: int = 0
    idle_since: float = 0.0
    open_url: str | None = None
    hibernating: asyncio.Task[bool] | None = None
    resuming: asyncio.Task[SessionRecord] | None = None
    cannot_hibernate: bool = False
    """The driver refused this idle spell; asked again after the next viewer leaves."""


class SessionManager:
    """Creates, watches, stops and reaps sessions; the verbs the API and the bridge call.

    Call :meth:`start` once (recovery and the reaper), :meth:`attach_bridge` once the bridge
    exists, and :meth:`close` on shutdown (it stops every session).
    """

    def __init__(
        self,
        config: ControllerConfig,
        store: Store,
        driver: Driver,
        catalogue: Catalogue,
        *,
        events: SessionEvents | None = None,
        tickets: TicketBook | None = None,
        clock: Clock = time.time,
        registry: prometheus_client.CollectorRegistry | None = None,
        signins: SignIns | None = None,
        controller_id: str | None = None,
    ) -> None:
        self.config = config
        self.controller_id = controller_id
        """Recorded on the sessions this manager creates; it recovers, reaps and stops on
        shutdown only those (and unrecorded ones). None: every session is its own."""
        self.store = store
        self.driver = driver
        self.catalogue = catalogue
        self.events = events if events is not None else SessionEvents()
        self.tickets = tickets if tickets is not None else TicketBook()
        rate = config.create_rate
        self._creation_rate = None if rate is None else CreationRate(*rate, clock=clock)
        self._clock = clock
        self._bridge: ViewerCloser | None = None
        self._runtime: dict[str, _Runtime] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._store_watch: asyncio.Task[None] | None = None
        self._closing = False
        self._started = False
        self._metrics = SessionMetrics(registry)
        if registry is not None:
            registry.register(HostCollector(self.hosts))
        self.keeper = SignInKeeper(signins, driver)
        self.runs = RunManager(
            config, store, driver, catalogue, self.keeper, clock=clock, controller_id=controller_id
        )
        """The headless runs (``/api/runs``): same driver, catalogue and kept sign-ins."""
        self.peers = None
        """Heartbeat, viewers at other controllers, takeover (:mod:`.peers`); None without id."""
        if controller_id is not None:
            self.peers = Peers(
                store,
                controller_id,
                takeover_after=config.controller_takeover_after,
                can_adopt=driver.can_adopt,
                clock=clock,
                adopt=self._recover_one,
                settle_run=self.runs.settle_taken,
            )

    # --- lifecycle of the manager --------------------------------------------------------------

    def attach_bridge(self, bridge: ViewerCloser) -> None:
        """Let the manager close a session's viewers when it stops or fails."""
        self._bridge = bridge

    async def start(self) -> None:
        """Recover sessions left by a previous run, then start the reaper and the store watch."""
        await self.driver.prepare()
        await self.recover()
        await self.runs.recover()
        await self.end_removed_users()
        if self.peers is not None:
            self.peers.beat()
        self._started = True
        self._reaper = asyncio.create_task(self._reap_forever(), name="session-reaper")
        self._store_watch = asyncio.create_task(self._watch_store(), name="store-watch")

    @property
    def ready(self) -> bool:
        """True once recovery is done and until shutdown begins."""
        return self._started and not self._closing

    async def close(self) -> None:
        """Refuse new sessions, end (or, with ``on_shutdown = keep``, keep) each, close the driver.

        Kept are only ready sessions the driver can let go of (:meth:`Driver.detach`); the next
        controller takes them back in :meth:`recover`. Every other one is stopped with
        :data:`RESTART_REASON`.
        """
        self._closing = True
        for task in (self._reaper, self._store_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # A hibernated session has no process: it stays hibernated for the next start.
        active = [r for r in self._own_active() if r.state is not State.HIBERNATED]
        if self.config.on_shutdown == "keep":
            active = [r for r in active if not await self._keep(r)]
        await asyncio.gather(
            *(self.stop(r.id, reason=RESTART_REASON, cause="restart") for r in active),
            return_exceptions=True,
        )
        await self.runs.close()
        await self.keeper.close()
        await self.driver.close()

    async def _keep(self, record: SessionRecord) -> bool:
        """Let a ready session outlive this controller if the driver can; True if it was kept."""
        if record.state is not State.READY:
            return False
        runtime = self._runtime.get(record.id)
        watcher = runtime.task if runtime is not None else None
        await self.keeper.finish(record.id)  # HOME is still reachable: keep the sign-in now
        if not self.driver.detach(record.id):
            return False
        self._runtime.pop(record.id, None)
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self._close_viewers(record.id, 1012, "remote-cli is restarting; reconnect soon")
        log.info("session kept for the next start", session_id=record.id)
        return True

    async def recover(self) -> None:
        """Settle every session a previous controller left active.

        A ``ready`` session whose sandbox still runs (``driver.recover`` returns its endpoint)
        stays ready and is watched again; a hibernated one whose saved state is whole stays
        hibernated (as does a ready one the driver had saved just before the restart); anything
        else is stopped through the driver and marked ``failed`` (it was running, starting or
        hibernated) or ``stopped`` (it was stopping).
        """
        for record in self._own_active():
            await self._recover_one(record)
        self._metrics.active.set(self.store.count_active())

    async def _recover_one(self, record: SessionRecord, lost: str | None = None) -> None:
        """Recover one session as :meth:`recover` does; ``lost`` names the silent controller
        it was taken over from (:mod:`.peers`), None on this controller's own restart."""
        workdir = self._workdir(record.id)
        if record.state in (State.READY, State.HIBERNATED) and await self._recover_asleep(
            record, workdir
        ):
            return
        try:
            endpoint = await self.driver.recover(record.id, workdir)
        except RemoteCliError as exc:
            endpoint = None
            log.warning("recover failed", session_id=record.id, error=exc.message)
        except Exception:  # one session's leftovers must not keep the controller down
            endpoint = None
            log.exception("recover crashed", session_id=record.id)
        if endpoint is not None and record.state is State.HIBERNATED:
            # Resumed by the last controller, which stopped before recording it.
            record = self._apply(record.id, Event.RESUME, endpoint=endpoint)
        if endpoint is not None and record.state is State.READY:
            runtime = self._runtime.setdefault(record.id, _Runtime())
            runtime.idle_since = self._clock()
            runtime.task = asyncio.create_task(self._watch(record.id))
            log.info("session recovered", session_id=record.id, lost_controller=lost)
            return
        if endpoint is not None:
            with contextlib.suppress(RemoteCliError):
                await self.driver.stop(record.id)
        if record.state is State.STOPPING:
            where = "remote-cli was down" if lost is None else f"its controller {lost} was down"
            self._apply(record.id, Event.STOPPED, reason=f"stopped while {where}")
        else:
            ended = "its processes were gone" if endpoint is None else "it could not be kept"
            if record.state is State.HIBERNATED:
                ended = "its saved state was gone or unusable"
            what = "remote-cli was restarted"
            if lost is not None:
                what = takeover_reason(lost, self.controller_id, self.config)
            self._apply(
                record.id,
                Event.FAIL,
                reason=f"{what} while the session was {record.state.value} and {ended}; "
                "start a new one",
                cause="restart",
            )

    async def _recover_asleep(self, record: SessionRecord, workdir: Path) -> bool:
        """Keep ``record`` hibernated if the driver holds its whole saved state; True if so.

        A ready one is recorded hibernated: the last controller stopped between the driver's
        save and the store's change.
        """
        try:
            whole = await self.driver.recover_hibernated(record.id, workdir)
        except RemoteCliError as exc:
            log.warning("hibernated state not recovered", session_id=record.id, error=exc.message)
            return False
        except Exception:  # one session's leftovers must not keep the controller down
            log.exception("recovering a hibernated state crashed", session_id=record.id)
            return False
        if not whole:
            return False
        if record.state is State.READY:
            record = self._apply(record.id, Event.HIBERNATE)
        # The last viewer's time is lost with the old controller; falling asleep came later,
        # so idle_stop counted from it can only come late, never early.
        self._runtime.setdefault(record.id, _Runtime()).idle_since = record.updated_at
        log.info("session kept hibernated", session_id=record.id)
        return True

    async def end_removed_users(self) -> list[str]:
        """Stop every active session whose owner was removed (``remotecli user remove``).

        Returns the ids stopped. Runs on start and whenever the store changes underneath.
        """
        doomed = [r.id for r in self.store.removed_owners_with_sessions() if self._runs(r)]
        if doomed:
            await asyncio.gather(
                *(
                    self.stop(sid, reason="its user was removed", cause="user-removed")
                    for sid in doomed
                ),
                return_exceptions=True,
            )
            log.info("sessions of removed users ended", session_ids=doomed)
        await self.runs.end_removed_users()
        return doomed

    async def _watch_store(self) -> None:
        seen = self.store.data_version
        while True:
            await asyncio.sleep(STORE_POLL)
            try:
                version = self.store.data_version
                if version != seen:
                    seen = version
                    await self.end_removed_users()
                    await self.carry_out_stops()
                if self.peers is not None:
                    await self.peers.round()
            except Exception:  # the watch must outlive one bad round
                log.exception("store watch round failed")

    # --- the API's operations ------------------------------------------------------------------

    def create(self, owner: str, provider: str, label: str | None = None) -> SessionRecord:
        """Store a new session for ``owner`` (named ``label``) and start it in the background.

        Raises Unprocessable (422) for an unknown or uninstalled provider, TooManyRequests (429)
        over the per-user limit, the user's fair share of the host or the creation rate,
        ServiceUnavailable (503) over the host limit or while shutting down.
        """
        status = self.catalogue.get(provider)
        argv = status.argv()
        if self._closing:
            raise ServiceUnavailable("the controller is shutting down; try again in a moment")
        per_user, host_cap = self.config.max_sessions_per_user, self.config.max_sessions
        active = self.store.active_sessions()
        mine = sum(1 for r in active if r.owner == owner)
        if mine >= per_user:
            raise TooManyRequests(
                f"you already have {per_user} active sessions, the limit per user; "
                "delete one (DELETE /api/sessions/{id}) and try again",
                limit=per_user,
            )
        if len(active) >= host_cap:
            raise ServiceUnavailable(
                f"this host already runs {host_cap} sessions, its limit; "
                "try again when one ends (operators: REMOTECLI_MAX_SESSIONS)",
                limit=host_cap,
            )
        others = len({r.owner for r in active} - {owner})
        share = fair_share(host_cap, per_user, others)
        if mine >= share:
            raise TooManyRequests(
                f"you hold {mine} active session(s), your fair share of this host: its "
                f"{host_cap} places are shared so that each user holds at most "
                f"{host_cap} // ({others} other user(s) with sessions + 2) = {share}, which "
                "keeps room for newcomers; delete one (DELETE /api/sessions/{id}) and try again",
                limit=share,
                other_users=others,
            )
        if self._creation_rate is not None:
            self._creation_rate.check(owner)
        record = self.store.create_session(
            new_session_id(),
            owner,
            provider,
            self._clock(),
            label=clean_label(label),
            controller=self.controller_id,
        )
        if self._creation_rate is not None:
            self._creation_rate.spend(owner)  # only once accepted: a full disk costs nothing
        self._metrics.active.set(self.store.count_active())
        self._publish_state(record)
        home_files, base = self.keeper.restore(owner, provider)
        spec = SessionSpec(
            session_id=record.id,
            provider=provider,
            command=argv,
            workdir=self._workdir(record.id),
            home_files=home_files,
            keeps_signin=bool(status.provider.keep),
            open_url=functools.partial(self._open_url, record.id),
        )
        runtime = self._runtime.setdefault(record.id, _Runtime())
        keep = (owner, provider, status.provider.keep, base)
        runtime.task = asyncio.create_task(
            self._run(record, spec, keep), name=f"session-{record.id}"
        )
        log.info("session created", session_id=record.id, owner=owner, provider=provider)
        return record

    def get(self, owner: str, session_id: str) -> SessionRecord:
        """Return ``owner``'s session; NotFound (404) for an unknown one or someone else's."""
        record = self.store.session_of(owner, session_id)
        if record is None:
            raise NotFound(
                f"no session {session_id} among yours; list them with GET /api/sessions",
                session_id=session_id,
            )
        return record

    def relabel(self, owner: str, session_id: str, label: str | None) -> SessionRecord:
        """Give ``owner``'s session a new label (None or blank removes it); 404 as :meth:`get`."""
        self.get(owner, session_id)
        return self.store.set_label(session_id, clean_label(label))

    def follow(self, owner: str, session_id: str) -> tuple[SessionEvent, Subscription]:
        """Subscribe to ``owner``'s session; return its current state as the first event.

        Subscribed before the state is read, so no change falls between the two. The caller
        closes the subscription (after a final first event at once).
        """
        self.get(owner, session_id)
        subscription = self.events.subscribe(session_id)
        record = self.store.session(session_id)
        first = SessionEvent(
            type="state",
            session_id=session_id,
            state=record.state.value,
            elapsed=self._clock() - record.created_at,
            reason=record.reason,
        )
        return first, subscription

    def providers(self) -> list[ProviderStatus]:
        """Return every provider in the catalogue and whether this driver can run it."""
        return self.catalogue.statuses()

    def preparing(self, status: ProviderStatus) -> str | None:
        """Say what a first session of this provider would wait for now, or None."""
        return self.driver.preparing(status.command) if status.available else None

    def connections(self, owner: str) -> dict[str, tuple[float, float]]:
        """Return ``owner``'s kept sign-ins: provider → (connected_at, updated_at)."""
        signins = self.keeper.signins
        return {} if signins is None else signins.status(owner)

    def disconnect(self, owner: str, provider: str) -> None:
        """Forget ``owner``'s kept sign-in for ``provider`` (422 for an unknown provider)."""
        self.catalogue.get(provider)
        if self.keeper.signins is not None and self.keeper.signins.forget(owner, provider):
            log.info("signin_forgotten", owner=owner, provider=provider)

    def open_url(self, session_id: str) -> str | None:
        """Return the latest link the session asked to open, if any."""
        runtime = self._runtime.get(session_id)
        return None if runtime is None else runtime.open_url

    async def callback(self, owner: str, session_id: str, url: str) -> tuple[int, str]:
        """Relay a pasted sign-in callback to ``owner``'s ready session; see relay_callback."""
        self.viewable(owner, session_id)  # 404 if not theirs, 409 unless ready
        log.info("signin_callback", session_id=session_id)
        return await relay_callback(self.driver, session_id, url)

    def active_count(self) -> int:
        """Return how many sessions are pending, starting, ready, hibernated or stopping."""
        return self.store.count_active()

    def isolation(self) -> Mapping[str, object] | None:
        """Return what the driver says about its isolation on this host (``/readyz``)."""
        return self.driver.isolation()

    def hosts(self) -> Sequence[HostStatus] | None:
        """Return the hosts the driver runs sessions on, as last seen (``/readyz``, metrics)."""
        return self.driver.hosts()

    def owned(self, owner: str) -> list[SessionRecord]:
        """Return ``owner``'s sessions, newest first."""
        return self.store.sessions(owner)

    def issue_ticket(self, owner: str, session_id: str) -> tuple[str, float]:
        """Return a single-use WebSocket ticket for ``owner``'s session and its lifetime."""
        record = self.get(owner, session_id)
        if is_final(record.state):
            raise Conflict(
                f"session {session_id} is {record.state.value}; create a new session",
                session_id=session_id,
            )
        return self.tickets.issue(session_id, owner)

    def viewers(self, session_id: str) -> int:
        """Return how many viewers are attached to a session now."""
        runtime = self._runtime.get(session_id)
        return 0 if runtime is None else runtime.viewers

    def watched(self, session_id: str) -> bool:
        """True while the manager watches the session's sandbox for an exit."""
        runtime = self._runtime.get(session_id)
        return runtime is not None and runtime.task is not None and not runtime.task.done()

    async def stop(
        self, session_id: str, *, reason: str | None = None, cause: str | None = None
    ) -> SessionRecord:
        """Stop a session (idempotent) and return it once ``stopped`` (or ``failed``).

        ``cause`` is a short word kept with the session (``restart``, ``user-removed``, ...).
        """
        record = self.store.session(session_id)
        if is_final(record.state):
            return record
        if not self._runs(record):
            return await self._ask_owner_to_stop(record, reason, cause)
        runtime = self._runtime.setdefault(session_id, _Runtime())
        if runtime.stopping is None:
            runtime.stopping = asyncio.create_task(self._stop(session_id, reason, cause))
        return await asyncio.shield(runtime.stopping)

    def _runs(self, record: SessionRecord) -> bool:
        """Whether this manager runs ``record`` (it made it, or no controller is recorded)."""
        return self.controller_id is None or record.controller in (None, self.controller_id)

    def _own_active(self) -> list[SessionRecord]:
        return self.store.active_sessions(self.controller_id)

    async def _ask_owner_to_stop(
        self, record: SessionRecord, reason: str | None, cause: str | None
    ) -> SessionRecord:
        """Stop a session another controller runs: record ``stopping`` in the shared store; its
        controller sees it within :data:`STORE_POLL` and stops it (keeping its sign-in, as its
        own stop would). Returns the session once final, or as it is after
        :data:`REMOTE_STOP_WAIT` (still ``stopping`` while its controller is down: that one's
        restart ends it)."""
        if record.state is not State.STOPPING:
            with contextlib.suppress(Conflict):  # it ended or was asked meanwhile
                record = self._apply(record.id, Event.STOP, reason=reason, cause=cause)
        deadline = self._clock() + REMOTE_STOP_WAIT
        while not is_final(record.state) and self._clock() < deadline:
            await asyncio.sleep(STORE_POLL / 4)
            record = self.store.session(record.id)
        return record

    async def carry_out_stops(self) -> list[str]:
        """Stop this manager's sessions that another controller recorded ``stopping``.

        Returns their ids. The store watch calls it every :data:`STORE_POLL`.
        """
        asked = [
            r.id
            for r in self._own_active()
            if r.state is State.STOPPING
            and (r.id not in self._runtime or self._runtime[r.id].stopping is None)
        ]
        if asked:
            await asyncio.gather(*(self.stop(sid) for sid in asked), return_exceptions=True)
            log.info("sessions stopped at another controller's request", session_ids=asked)
        return asked

    async def _stop(self, session_id: str, reason: str | None, cause: str | None) -> SessionRecord:
        record = self.store.session(session_id)
        if is_final(record.state):
            return record  # it failed between the request and now
        if record.state is not State.STOPPING:
            record = self._apply(session_id, Event.STOP, reason=reason, cause=cause)
        runtime = self._runtime.setdefault(session_id, _Runtime())
        for task in (runtime.task, runtime.resuming):
            if task is not None and not task.done():
                task.cancel()  # a resume cut short leaves the saved state, removed below
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if runtime.hibernating is not None:
            # Let a save finish (a fraction of a second): the driver then holds either the
            # running VM or the saved state, and its stop removes whichever it is.
            with contextlib.suppress(Exception):
                await asyncio.shield(runtime.hibernating)
        await self._close_viewers(session_id, 1000, "session stopped")
        await self.keeper.finish(session_id)  # HOME is still there: keep the sign-in
        try:
            await self.driver.stop(session_id)
        except RemoteCliError as exc:
            record = self._apply(session_id, Event.FAIL, reason=f"stopping failed: {exc.message}")
        except Exception as exc:  # a driver bug must still end the session, not leave it stopping
            log.exception("driver stop crashed", session_id=session_id)
            record = self._apply(session_id, Event.FAIL, reason=f"stopping failed: {exc!r}")
        else:
            record = self._apply(session_id, Event.STOPPED)
        finally:
            self._runtime.pop(session_id, None)
        return record

    # --- one session's task --------------------------------------------------------------------

    def _progress(self, record: SessionRecord, state: State) -> Callable[[str], None]:
        """A driver's progress callback: each step an SSE ``progress`` event of the session."""

        def progress(message: str) -> None:
            self.events.publish(
                SessionEvent(
                    type="progress",
                    session_id=record.id,
                    state=state.value,
                    elapsed=self._clock() - record.created_at,
                    message=message,
                )
            )

        return progress

    async def _run(
        self,
        record: SessionRecord,
        spec: SessionSpec,
        keep: tuple[str, str, Sequence[str], int | None],
    ) -> None:
        session_id = record.id
        progress = self._progress(record, State.STARTING)

        try:
            self._apply(session_id, Event.START)
            endpoint = await self.driver.start(spec, progress)
        except RemoteCliError as exc:
            await self._fail(session_id, exc.message)
            return
        except Exception as exc:  # a driver bug must still end as a failed session, not a hang
            log.exception("driver start crashed", session_id=session_id)
            await self._fail(session_id, f"the driver crashed while starting: {exc!r}")
            return
        ready = self._apply(session_id, Event.READY, endpoint=endpoint)
        self.keeper.watch(session_id, *keep)
        self._metrics.start_seconds.observe((ready.ready_at or 0.0) - record.created_at)
        self._runtime.setdefault(session_id, _Runtime()).idle_since = self._clock()
        await self._watch(session_id)

    async def _watch(self, session_id: str) -> None:
        try:
            reason = await self.driver.wait(session_id)
        except RemoteCliError as exc:
            reason = exc.message
        except Exception as exc:  # a driver bug: the session is not known to run any more
            log.exception("driver wait crashed", session_id=session_id)
            reason = f"the driver lost the session: {exc!r}"
        runtime = self._runtime.get(session_id)
        if runtime is not None and runtime.hibernating is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(runtime.hibernating)  # the driver ended it to save it
        record = self.store.find_session(session_id)
        if record is None or record.state is not State.READY:
            return  # a stop or a hibernation we asked for
        await self._fail(session_id, f"the session ended by itself: {reason}")

    async def _fail(self, session_id: str, reason: str) -> None:
        runtime = self._runtime.get(session_id)
        if runtime is not None and runtime.stopping is not None:
            return  # a stop is under way: its outcome is the session's
        try:
            self._apply(session_id, Event.FAIL, reason=reason)
        except Conflict:
            return  # already final: a stop won the race
        await self._close_viewers(session_id, 1011, f"session failed: {reason}"[:120])
        await self.keeper.finish(session_id)
        with contextlib.suppress(RemoteCliError):
            await self.driver.stop(session_id)
        runtime = self._runtime.get(session_id)
        if runtime is not None and runtime.stopping is None:
            self._runtime.pop(session_id, None)

    # --- reaper --------------------------------------------------------------------------------

    async def reap(self) -> list[str]:
        """Stop sessions past their TTL and those without a viewer for ``idle_stop``; hibernate
        ready ones without a viewer for ``hibernate_after``.

        Returns the ids it stopped. The reaper task calls it every ``reap_interval`` seconds.
        ``idle_stop`` counts from the last viewer whether the session is ready or hibernated:
        hibernating does not change when a session is stopped.
        """
        now = self._clock()
        ttl, idle = self.config.session_ttl, self.config.idle_stop
        asleep = self.config.hibernate_after
        doomed: dict[str, str] = {}
        drowsy: list[str] = []
        for record in self._own_active():
            if record.state is State.STOPPING:
                continue
            runtime = self._runtime.get(record.id)
            unwatched = (
                runtime is not None and runtime.viewers == 0 and not watched_elsewhere(record, now)
            )
            idle_for = now - last_viewed(runtime.idle_since, record) if runtime is not None else 0.0
            if ttl and now - record.created_at >= ttl:
                doomed[record.id] = f"its time to live ({describe_duration(ttl)}) ran out"
            elif (
                idle
                and record.state in (State.READY, State.HIBERNATED)
                and unwatched
                and idle_for >= idle
            ):
                doomed[record.id] = f"no viewer was attached for {describe_duration(idle)}"
            elif (
                asleep
                and record.state is State.READY
                and runtime is not None
                and unwatched
                and not runtime.cannot_hibernate
                and idle_for >= asleep
            ):
                drowsy.append(record.id)
        for session_id in drowsy:  # one at a time: each writes the guest's RAM to disk
            try:
                await self.hibernate(session_id)
            except RemoteCliError as exc:
                log.warning("could not hibernate", session_id=session_id, error=exc.message)
        results = await asyncio.gather(
            *(self.stop(sid, reason=why) for sid, why in doomed.items()), return_exceptions=True
        )
        for sid, result in zip(doomed, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("reaper could not stop a session", session_id=sid, error=repr(result))
            else:
                log.info("session reaped", session_id=sid, reason=doomed[sid])
        return list(doomed)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_interval)
            try:
                await self.reap()
            except Exception:  # the reaper must outlive one bad round
                log.exception("reaper round failed")

    # --- hibernation ---------------------------------------------------------------------------

    async def hibernate(self, session_id: str) -> bool:
        """Hibernate a ready session that has no viewer; True once it is ``hibernated``.

        False, and the session runs on, when it is not ready, has a viewer, or the driver
        cannot (the local driver; a disk too full). Concurrent calls share one attempt.
        """
        runtime = self._runtime.setdefault(session_id, _Runtime())
        if runtime.hibernating is None:
            runtime.hibernating = asyncio.create_task(
                self._hibernate(session_id, runtime), name=f"hibernate-{session_id}"
            )
        return await asyncio.shield(runtime.hibernating)

    async def _hibernate(self, session_id: str, runtime: _Runtime) -> bool:
        try:
            record = self.store.session(session_id)
            busy = runtime.viewers or runtime.stopping is not None or runtime.resuming is not None
            busy = busy or watched_elsewhere(record, self._clock())
            if record.state is not State.READY or busy or self._closing:
                return False
            await self.keeper.checkpoint(session_id)  # HOME is reachable until the save
            try:
                saved = await self.driver.hibernate(session_id)
            except RemoteCliError as exc:
                log.warning("hibernating failed", session_id=session_id, error=exc.message)
                return False
            except Exception:  # a driver bug: the session runs on, or its watcher sees it end
                log.exception("driver hibernate crashed", session_id=session_id)
                return False
            if not saved:
                runtime.cannot_hibernate = True
                return False
            try:
                self._apply(session_id, Event.HIBERNATE)
            except Conflict:
                return False  # a stop came meanwhile; its driver stop removes the saved state
            return True
        finally:
            runtime.hibernating = None

    async def hibernate_now(self, owner: str, session_id: str) -> SessionRecord:
        """Hibernate ``owner``'s session at once (``POST .../hibernate``); return it.

        404 as :meth:`get`; 409 unless it is ready without a viewer, or when the driver cannot
        hibernate; a hibernated session is returned as it is.
        """
        record = self.get(owner, session_id)
        if record.state is State.HIBERNATED:
            return record
        if record.state is State.READY and self.viewers(session_id):
            raise Conflict(
                f"session {session_id} has {self.viewers(session_id)} viewer(s); close them "
                "first (a session is hibernated only when nobody watches it)",
                session_id=session_id,
                state=record.state.value,
            )
        if record.state is not State.READY:
            raise Conflict(
                f"session {session_id} is {record.state.value}; only a ready session can be "
                "hibernated",
                session_id=session_id,
                state=record.state.value,
            )
        if not await self.hibernate(session_id):
            record = self.store.session(session_id)
            if record.state is not State.HIBERNATED:
                raise Conflict(
                    f"session {session_id} was not hibernated: the {self.driver.name} driver "
                    "cannot hibernate it now (see the controller's log)",
                    session_id=session_id,
                    state=record.state.value,
                )
        return self.store.session(session_id)

    async def wake(self, owner: str, session_id: str) -> VncEndpoint:
        """Return ``owner``'s session's endpoint, resuming it first if it is hibernated.

        What a viewer calls: the user came back. A hibernation under way is waited for, then
        undone. 404 as :meth:`get`; 409 unless ready (or hibernated); the driver's error, with
        the session then failed, when the resume fails.
        """
        self.get(owner, session_id)
        runtime = self._runtime.get(session_id)
        if runtime is not None and runtime.hibernating is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(runtime.hibernating)
        if self.store.session(session_id).state is State.HIBERNATED:
            await self.resume(session_id)
        return self.viewable(owner, session_id)

    async def resume(self, session_id: str) -> SessionRecord:
        """Resume a hibernated session and return it ``ready``; other states are returned as
        they are. Concurrent calls share one resume.

        A failed resume fails the session with the driver's reason (its saved state could not
        be loaded, and would not be the next time either) and raises the driver's error.
        """
        runtime = self._runtime.setdefault(session_id, _Runtime())
        if runtime.resuming is None:
            runtime.resuming = asyncio.create_task(
                self._resume(session_id, runtime), name=f"resume-{session_id}"
            )
        return await asyncio.shield(runtime.resuming)

    async def _resume(self, session_id: str, runtime: _Runtime) -> SessionRecord:
        try:
            record = self.store.session(session_id)
            if record.state is not State.HIBERNATED:
                return record
            if self._closing:
                raise ServiceUnavailable("the controller is shutting down; try again in a moment")
            began = self._clock()
            progress = self._progress(record, State.HIBERNATED)

            try:
                endpoint = await self.driver.resume(session_id, self._workdir(session_id), progress)
            except RemoteCliError as exc:
                await self._fail(session_id, f"resuming it failed: {exc.message}")
                raise
            except Exception as exc:  # a driver bug must still end the session, not leave it
                log.exception("driver resume crashed", session_id=session_id)
                await self._fail(session_id, f"the driver crashed while resuming it: {exc!r}")
                raise
            record = self._apply(session_id, Event.RESUME, endpoint=endpoint)
            runtime.idle_since = self._clock()
            runtime.cannot_hibernate = False
            runtime.task = asyncio.create_task(self._watch(session_id))
            log.info("session resumed", session_id=session_id, seconds=self._clock() - began)
            return record
        finally:
            runtime.resuming = None

    # --- viewers (the bridge's accounting, through ViewerAccess) ---------------------------------

    def viewable(self, owner: str, session_id: str) -> VncEndpoint:
        """Return the VNC endpoint of ``owner``'s session; 404 if not theirs, 409 unless ready."""
        record = self.get(owner, session_id)
        if record.state is not State.READY or record.endpoint is None:
            raise Conflict(
                f"session {session_id} is {record.state.value}, not ready; "
                f"wait for ready on GET /api/sessions/{session_id}/events",
                session_id=session_id,
                state=record.state.value,
            )
        return record.endpoint

    async def tty_endpoint(self, owner: str, session_id: str) -> TtyEndpoint:
        """Return where ``owner``'s session's text terminal listens; 404, 409 as viewable.

        A hibernated session is resumed first (:meth:`wake`). Raises the driver's DriverError
        when the session has no text terminal.
        """
        await self.wake(owner, session_id)
        return await self.driver.tty_endpoint(session_id)

    def viewer_attached(self, session_id: str) -> None:
        """Count a viewer in (a session with a viewer is never idle, whichever controller
        runs it: :mod:`.peers`)."""
        self._runtime.setdefault(session_id, _Runtime()).viewers += 1
        self._metrics.viewers.inc()
        record = self.store.find_session(session_id) if self.peers is not None else None
        if self.peers is not None and record is not None:
            self.peers.viewer_attached(record)

    def viewer_detached(self, session_id: str, bytes_in: int, bytes_out: int) -> None:
        """Count a viewer out, add its bytes to the session, restart the idle clock."""
        runtime = self._runtime.get(session_id)
        if runtime is not None:
            runtime.viewers = max(0, runtime.viewers - 1)
            runtime.idle_since = self._clock()
            runtime.cannot_hibernate = False  # a new idle spell: the driver is asked again
        self._metrics.viewers.dec()
        self.store.add_bytes(session_id, bytes_in, bytes_out)
        if self.peers is not None:
            self.peers.viewer_detached(session_id)

    # --- internals -----------------------------------------------------------------------------

    def _open_url(self, session_id: str, url: str) -> None:
        runtime = self._runtime.get(session_id)
        record = self.store.find_session(session_id)
        if runtime is None or record is None:
            return
        runtime.open_url = url
        self.events.publish(
            SessionEvent(
                type="open-url",
                session_id=session_id,
                state=record.state.value,
                elapsed=self._clock() - record.created_at,
                url=url,
            )
        )

    def _workdir(self, session_id: str) -> Path:
        return self.config.data_dir / "sessions" / session_id

    def _apply(
        self,
        session_id: str,
        event: Event,
        *,
        reason: str | None = None,
        endpoint: VncEndpoint | None = None,
        cause: str | None = None,
    ) -> SessionRecord:
        before, record = self.store.apply(
            session_id, event, self._clock(), reason=reason, endpoint=endpoint, cause=cause
        )
        self._metrics.transitions.labels(record.state.value).inc()
        self._metrics.active.set(self.store.count_active())
        log.info(
            "session transition",
            session_id=session_id,
            from_state=before.value,
            to_state=record.state.value,
            reason=reason,
        )
        self._publish_state(record, reason)
        return record

    def _publish_state(self, record: SessionRecord, reason: str | None = None) -> None:
        self.events.publish(
            SessionEvent(
                type="state",
                session_id=record.id,
                state=record.state.value,
                elapsed=self._clock() - record.created_at,
                reason=reason or record.reason,
            )
        )

    async def _close_viewers(self, session_id: str, code: int, reason: str) -> None:
        if self._bridge is None:
            return
        try:
            await self._bridge.close_viewers(session_id, code, reason)
        except Exception:  # closing viewers must never block a stop
            log.exception("closing viewers failed", session_id=session_id)
