"""Per-session publish/subscribe of session events, for the SSE stream.

The session manager publishes a ``state`` event for every transition and a ``progress`` event
for every step a driver reports; each carries the seconds elapsed since the session was
created. A subscriber gets the events published after it subscribed, in order; the SSE endpoint
sends the current state first, so nothing is missed. A slow subscriber never blocks the
publisher: past :data:`QUEUE_LIMIT` queued events it is dropped and its stream ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

QUEUE_LIMIT = 256


@dataclass(frozen=True)
class SessionEvent:
    """One thing that happened to a session."""

    type: Literal["state", "progress", "open-url"]
    session_id: str
    state: str
    elapsed: float
    """Seconds since the session was created."""
    message: str | None = None
    reason: str | None = None
    url: str | None = None
    """On ``open-url``: the link the session asked a browser to open (http or https)."""

    def to_json(self) -> dict[str, Any]:
        """Return the event as the JSON object sent in an SSE ``data:`` line."""
        data = asdict(self)
        data["elapsed"] = round(self.elapsed, 3)
        return data

    @property
    def final(self) -> bool:
        """True when the session reached a state it never leaves."""
        return self.type == "state" and self.state in ("stopped", "failed")


class Subscription:
    """A subscriber's queue of events; iterate it, and :meth:`close` it when done."""

    def __init__(self, hub: SessionEvents, session_id: str) -> None:
        self._hub = hub
        self.session_id = session_id
        self._queue: asyncio.Queue[SessionEvent | None] = asyncio.Queue()
        self.dropped = False

    def _offer(self, event: SessionEvent) -> None:
        if self.dropped:
            return
        if self._queue.qsize() >= QUEUE_LIMIT:
            self.dropped = True
            self._queue.put_nowait(None)
            return
        self._queue.put_nowait(event)

    def pending(self) -> int:
        """Return how many events wait to be read."""
        return self._queue.qsize()

    async def get(self) -> SessionEvent | None:
        """Return the next event, or None when this subscriber was dropped for being slow."""
        return await self._queue.get()

    async def __aiter__(self) -> AsyncIterator[SessionEvent]:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Stop receiving events."""
        self._hub._remove(self)


class SessionEvents:
    """The hub: subscribe to one session's events, publish events to its subscribers."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}

    def subscribe(self, session_id: str) -> Subscription:
        """Return a subscription to the events of ``session_id`` published from now on."""
        subscription = Subscription(self, session_id)
        self._subscribers.setdefault(session_id, set()).add(subscription)
        return subscription

    def publish(self, event: SessionEvent) -> None:
        """Queue ``event`` for every subscriber of its session; never blocks."""
        for subscription in list(self._subscribers.get(event.session_id, ())):
            subscription._offer(event)

    def subscriber_count(self, session_id: str) -> int:
        """Return how many streams follow ``session_id`` now."""
        return len(self._subscribers.get(session_id, ()))

    def _remove(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.session_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.session_id]
