"""The per-session event hub behind the SSE stream."""

from __future__ import annotations

from remotecli.controller.events import QUEUE_LIMIT, SessionEvent, SessionEvents


def state(session_id: str, value: str) -> SessionEvent:
    return SessionEvent(type="state", session_id=session_id, state=value, elapsed=0.5)


async def test_subscriber_gets_its_sessions_events_in_order() -> None:
    """A subscriber receives its session's events in order and none of other sessions."""
    hub = SessionEvents()
    subscription = hub.subscribe("s1")
    hub.publish(state("s1", "starting"))
    hub.publish(state("s2", "starting"))
    hub.publish(state("s1", "ready"))
    first, second = await subscription.get(), await subscription.get()
    assert first is not None
    assert second is not None
    assert [first.state, second.state] == ["starting", "ready"]
    assert subscription.pending() == 0


async def test_closed_subscription_is_forgotten() -> None:
    """After close() the hub holds no reference to the subscriber."""
    hub = SessionEvents()
    subscription = hub.subscribe("s1")
    assert hub.subscriber_count("s1") == 1
    subscription.close()
    assert hub.subscriber_count("s1") == 0
    hub.publish(state("s1", "ready"))


async def test_slow_subscriber_is_dropped_not_blocking() -> None:
    """Past the queue limit a subscriber is dropped (its stream ends); publishing never blocks."""
    hub = SessionEvents()
    subscription = hub.subscribe("s1")
    for _ in range(QUEUE_LIMIT + 10):
        hub.publish(state("s1", "starting"))
    received = [event async for event in subscription]
    assert len(received) == QUEUE_LIMIT
    assert subscription.dropped


def test_final_and_json() -> None:
    """stopped and failed are final; the JSON form rounds elapsed to milliseconds."""
    event = SessionEvent("state", "s1", "failed", 1.23456, reason="Xvfb died")
    assert event.final
    assert not state("s1", "ready").final
    assert event.to_json() == {
        "type": "state",
        "session_id": "s1",
        "state": "failed",
        "elapsed": 1.235,
        "message": None,
        "reason": "Xvfb died",
        "url": None,  # set on open-url events only; every event carries every field
    }
