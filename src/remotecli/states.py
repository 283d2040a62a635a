"""The session lifecycle: every state, every event and the one table of allowed transitions.

Everything that decides which state a session may move to lives here, as in h11's ``_state.py``.
The store applies :func:`next_state` inside the transaction that persists a change, so a refused
transition changes nothing. ::

    pending ──start──▶ starting ──ready──▶ ready ──stop──▶ stopping ──stopped──▶ stopped
       │                  │               │   ▲             ▲  │
       │                  │       hibernate   resume        │  │
       │                  │               ▼   │             │  │
       │                  │             hibernated ───stop──┘  │
       └──────stop────────┴───────▶ stopping ◀                 │
       └──────────────── fail (with a reason) ─────────────────┴──▶ failed

``stopped`` and ``failed`` are final: nothing leaves them. ``hibernated`` is a session with no
process: its memory and devices are saved to a file in its directory (``docs/microvm.md``).
It is entered and left only once the driver is done, so a controller that dies while saving
or loading finds the session in the state it was in before, with what that state needs on disk:
hibernating keeps the session ``ready`` (and running) until the file is complete; resuming
keeps it ``hibernated`` (and its file) until the new process reads its VNC banner. That is why
there is no ``hibernating`` or ``resuming`` state in between.
"""

from __future__ import annotations

from enum import StrEnum

from remotecli.exceptions import Conflict


class State(StrEnum):
    """Where a session is in its life."""

    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    HIBERNATED = "hibernated"
    STOPPED = "stopped"
    FAILED = "failed"


class Event(StrEnum):
    """What happens to a session."""

    START = "start"  # the driver was asked to start it
    READY = "ready"  # an RFB banner was read from its VNC server
    STOP = "stop"  # someone (a user, the reaper, a shutdown) asked it to stop
    STOPPED = "stopped"  # the driver removed every process it had
    FAIL = "fail"  # it broke; a reason comes with the event
    HIBERNATE = "hibernate"  # the driver saved it to disk and ended its processes (no viewer)
    RESUME = "resume"  # the driver started it again from its saved state (a viewer came back)


FINAL_STATES = frozenset({State.STOPPED, State.FAILED})
"""States a session never leaves."""

ACTIVE_STATES = frozenset(
    {State.PENDING, State.STARTING, State.READY, State.HIBERNATED, State.STOPPING}
)
"""States that count against the session limits and that a restart must recover.

A hibernated session counts: it costs disk instead of memory, but it resumes whenever its user
comes back, without asking for a place, so the limits must have kept one for it."""

TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.PENDING, Event.START): State.STARTING,
    (State.STARTING, Event.READY): State.READY,
    (State.PENDING, Event.STOP): State.STOPPING,
    (State.STARTING, Event.STOP): State.STOPPING,
    (State.READY, Event.STOP): State.STOPPING,
    (State.STOPPING, Event.STOPPED): State.STOPPED,
    (State.READY, Event.HIBERNATE): State.HIBERNATED,
    (State.HIBERNATED, Event.RESUME): State.READY,
    (State.HIBERNATED, Event.STOP): State.STOPPING,
    (State.HIBERNATED, Event.FAIL): State.FAILED,
    (State.PENDING, Event.FAIL): State.FAILED,
    (State.STARTING, Event.FAIL): State.FAILED,
    (State.READY, Event.FAIL): State.FAILED,
    (State.STOPPING, Event.FAIL): State.FAILED,
}
"""The one table: (state, event) → next state. A pair missing from it is refused."""


def next_state(state: State, event: Event) -> State:
    """Return the state ``event`` moves a session in ``state`` to.

    Raises :class:`~remotecli.exceptions.Conflict` (409) naming both when the table has no such
    transition; the caller must leave the session as it was.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        allowed = sorted(e.value for (s, e) in TRANSITIONS if s is state)
        hint = f"allowed: {', '.join(allowed)}" if allowed else f"{state.value} is final"
        raise Conflict(
            f"session is {state.value}; event {event.value!r} is not allowed ({hint})",
            state=state.value,
            event=event.value,
        ) from None


def is_final(state: State) -> bool:
    """Return True when nothing can happen to a session in ``state`` any more."""
    return state in FINAL_STATES
