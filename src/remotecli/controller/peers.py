"""This controller among others on one database: its heartbeat, viewers of sessions another
controller runs, and taking over the sessions of a controller gone silent.

Theory of operation. Each controller writes its heartbeat (``controllers.seen_at``) every
:data:`~remotecli.config.CONTROLLER_HEARTBEAT` seconds from its store watch. A viewer attached
through a controller that does not run the session is recorded in the session's
``viewed_at`` when it attaches and leaves, and every :data:`VIEW_REFRESH` seconds while it
stays (one statement for all such sessions, never one per frame); the owner's reaper takes a
session whose ``viewed_at`` is younger than :data:`VIEW_FRESH` as watched, and counts its idle
time from the latest of its own last viewer and ``viewed_at`` (:func:`last_viewed`). A
controller alone on its database writes no ``viewed_at`` at all: it runs every session.

With a driver whose :meth:`~remotecli.drivers.base.Driver.recover` finds any controller's
sessions (``can_adopt``: the cluster driver), a controller that finds another's heartbeat older
than ``controller_takeover_after`` adopts that one's active sessions, each in one
compare-and-set transaction (:meth:`~remotecli.controller.store.Store.adopt_session`: of two
survivors, one gets each session), then recovers each as a restart would. Clocks of the
controllers are assumed to agree within a second or two (NTP).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

from remotecli.config import CONTROLLER_HEARTBEAT, ControllerConfig
from remotecli.controller.store import RunRecord, SessionRecord, Store
from remotecli.logs import get_logger
from remotecli.quotas import describe_duration

log = get_logger("controller.peers")

VIEW_REFRESH = 5.0
"""Seconds between two writes of ``viewed_at`` for a session watched through this controller."""
VIEW_FRESH = 2 * VIEW_REFRESH
"""A ``viewed_at`` younger than this means a viewer is attached (one refresh may be late)."""

Adopt = Callable[[SessionRecord, str], Awaitable[None]]
"""Recovers one adopted session (now recorded as this controller's) lost with the named one."""
SettleRun = Callable[[RunRecord, str], Awaitable[None]]
"""Ends one adopted run (now recorded as this controller's), with the reason given."""


def watched_elsewhere(record: SessionRecord, now: float) -> bool:
    """True when a viewer attached through another controller was seen within VIEW_FRESH."""
    return record.viewed_at is not None and now - record.viewed_at < VIEW_FRESH


def last_viewed(idle_since: float, record: SessionRecord) -> float:
    """The latest viewer activity: the owner's own (``idle_since``) or another controller's."""
    return idle_since if record.viewed_at is None else max(idle_since, record.viewed_at)


def takeover_reason(lost: str, by: str | None, config: ControllerConfig) -> str:
    """Begin the reason of a session taken over that could not be recovered."""
    after = describe_duration(config.controller_takeover_after)
    return f"its controller {lost} went silent (no heartbeat for {after}) and {by} took it over"


@dataclasses.dataclass
class _Viewing:
    viewers: int
    written_at: float


class Peers:
    """One controller's part among several; the store watch calls :meth:`round`."""

    def __init__(
        self,
        store: Store,
        controller_id: str,
        *,
        takeover_after: float,
        can_adopt: bool,
        clock: Callable[[], float],
        adopt: Adopt,
        settle_run: SettleRun | None = None,
    ) -> None:
        self.store = store
        self.controller_id = controller_id
        self.takeover_after = takeover_after
        """0: never take over; also never when the driver cannot reach others' sessions."""
        self.can_adopt = can_adopt
        self._clock = clock
        self._adopt = adopt
        self._settle_run = settle_run
        self._unsettled: dict[str, tuple[RunRecord, str]] = {}
        """Runs adopted here whose ending failed (the database away): tried again each round."""
        self._viewing: dict[str, _Viewing] = {}
        self._beat_at = float("-inf")

    def beat(self) -> None:
        """Write this controller's heartbeat now."""
        now = self._clock()
        self.store.beat(self.controller_id, now)
        self._beat_at = now

    async def round(self) -> None:
        """Beat, refresh ``viewed_at`` and take over silent controllers' sessions, when due.

        A controller that could not beat for ``takeover_after`` itself (the database was
        unreachable, its host paused) judges nobody this round: the others may have been kept
        from beating by the same cause, and get one heartbeat's time to show they live.
        """
        gap = self._clock() - self._beat_at
        if gap >= CONTROLLER_HEARTBEAT:
            self.beat()
            if gap < self.takeover_after:
                await self.take_over()
            if self._unsettled:
                await asyncio.gather(*(self._settle(*held) for held in self._unsettled.values()))
        self.refresh_views()

    # --- viewers of sessions another controller runs -------------------------------------------

    def viewer_attached(self, record: SessionRecord) -> None:
        """Count a viewer of ``record`` in; recorded in the store if another controller runs it."""
        if record.controller in (None, self.controller_id):
            return
        now = self._clock()
        viewing = self._viewing.setdefault(record.id, _Viewing(0, now))
        viewing.viewers += 1
        viewing.written_at = now
        self.store.mark_viewed([record.id], now)

    def viewer_detached(self, session_id: str) -> None:
        """Count a viewer out; its leaving is recorded (the owner's idle time starts there)."""
        viewing = self._viewing.get(session_id)
        if viewing is None:
            return
        viewing.viewers -= 1
        if viewing.viewers <= 0:
            del self._viewing[session_id]
        self.store.mark_viewed([session_id], self._clock())

    def refresh_views(self) -> list[str]:
        """Write ``viewed_at`` of every session watched here, if VIEW_REFRESH has passed."""
        now = self._clock()
        due = [sid for sid, v in self._viewing.items() if now - v.written_at >= VIEW_REFRESH]
        self.store.mark_viewed(due, now)
        for session_id in due:
            self._viewing[session_id].written_at = now
        return due

    # --- takeover ------------------------------------------------------------------------------

    async def take_over(self) -> list[str]:
        """Adopt and recover the sessions of every controller silent for ``takeover_after``.

        Returns the ids adopted here. Nothing with ``takeover_after`` 0 or a driver that cannot
        reach another controller's sessions (they live on that controller's host).
        """
        if not self.takeover_after or not self.can_adopt:
            return []
        silent_since = self._clock() - self.takeover_after
        adopted: list[str] = []
        for lost in self.store.silent_controllers(silent_since, besides=self.controller_id):
            for record in self.store.sessions_run_by(lost):
                if not self.store.adopt_session(record.id, lost, self.controller_id):
                    continue  # another survivor took it first
                adopted.append(record.id)
                log.warning("session taken over", session_id=record.id, lost_controller=lost)
                try:
                    await self._adopt(
                        dataclasses.replace(record, controller=self.controller_id), lost
                    )
                except Exception:  # one session must not keep the others from being adopted
                    log.exception("recovering a session taken over failed", session_id=record.id)
            self.beat()  # adopting may take a while: this controller is not silent meanwhile
            adopted += await self._take_runs(lost)
            self.beat()
            self.store.forget_controller(lost, silent_since)
        return adopted

    async def _take_runs(self, lost: str) -> list[str]:
        """End the runs the silent controller ``lost`` ran, each adopted once: a run's output
        streamed through that controller, so it cannot go on; its sandbox or actor goes."""
        if self._settle_run is None:
            return []
        reason = (
            f"its controller {lost} went silent (no heartbeat for "
            f"{describe_duration(self.takeover_after)}) and {self.controller_id} ended it: "
            "a run's output streams through the controller that started it"
        )
        taken = []
        for record in self.store.runs_run_by(lost):
            if self.store.adopt_run(record.id, lost, self.controller_id):
                log.warning("run taken over", run_id=record.id, lost_controller=lost)
                taken.append(record)
            # else another survivor took it first
        await asyncio.gather(*(self._settle(record, reason) for record in taken))
        return [record.id for record in taken]

    async def _settle(self, record: RunRecord, reason: str) -> None:
        """End one adopted run; if that fails, keep it to try again next round (it is this
        controller's now: no other survivor will)."""
        assert self._settle_run is not None
        try:
            await self._settle_run(record, reason)
        except Exception:  # one run must not keep the others from being ended
            log.exception("ending a run taken over failed", run_id=record.id)
            self._unsettled[record.id] = (record, reason)
        else:
            self._unsettled.pop(record.id, None)
