"""The session lifecycle's transition table, tested purely."""

from __future__ import annotations

import pytest

from remotecli.exceptions import Conflict
from remotecli.states import (
    ACTIVE_STATES,
    FINAL_STATES,
    TRANSITIONS,
    Event,
    State,
    is_final,
    next_state,
)


def test_happy_path() -> None:
    """A session goes pending → starting → ready → stopping → stopped."""
    state = State.PENDING
    for event in (Event.START, Event.READY, Event.STOP, Event.STOPPED):
        state = next_state(state, event)
    assert state is State.STOPPED


@pytest.mark.parametrize(
    "state", [State.PENDING, State.STARTING, State.READY, State.HIBERNATED, State.STOPPING]
)
def test_fail_from_every_state_before_stopped(state: State) -> None:
    """Every non-final state can fail."""
    assert next_state(state, Event.FAIL) is State.FAILED


@pytest.mark.parametrize("state", [State.PENDING, State.STARTING, State.READY, State.HIBERNATED])
def test_stop_before_ready_or_after(state: State) -> None:
    """A session can be stopped while pending, starting, ready or hibernated."""
    assert next_state(state, Event.STOP) is State.STOPPING


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
@pytest.mark.parametrize("event", list(Event))
def test_final_states_refuse_everything(state: State, event: Event) -> None:
    """Nothing leaves stopped or failed: the refusal is a Conflict naming state and event."""
    with pytest.raises(Conflict) as caught:
        next_state(state, event)
    assert caught.value.status == 409
    assert caught.value.data == {"state": state.value, "event": event.value}
    assert state.value in caught.value.message
    assert event.value in caught.value.message


def test_wrong_transition_names_the_allowed_events() -> None:
    """Skipping a step (ready before start) is refused with the events that are allowed."""
    with pytest.raises(Conflict, match=r"session is pending; event 'ready' is not allowed"):
        next_state(State.PENDING, Event.READY)
    with pytest.raises(Conflict, match="allowed: fail, start, stop"):
        next_state(State.PENDING, Event.READY)


def test_table_is_complete_and_consistent() -> None:
    """Every pair not in the table is refused, every active state can fail, finals are final."""
    for state in State:
        for event in Event:
            if (state, event) in TRANSITIONS:
                assert next_state(state, event) is TRANSITIONS[(state, event)]
            else:
                with pytest.raises(Conflict):
                    next_state(state, event)
    assert {s for (s, _e) in TRANSITIONS} == set(ACTIVE_STATES)
    assert all(is_final(s) for s in FINAL_STATES)
    assert not any(is_final(s) for s in ACTIVE_STATES)


def test_hibernate_and_resume() -> None:
    """A ready session hibernates and resumes to ready, as often as it likes."""
    state = State.READY
    for _ in range(2):
        state = next_state(state, Event.HIBERNATE)
        assert state is State.HIBERNATED
        state = next_state(state, Event.RESUME)
        assert state is State.READY


@pytest.mark.parametrize("state", [State.PENDING, State.STARTING, State.STOPPING])
def test_only_a_ready_session_hibernates(state: State) -> None:
    """Hibernating is refused before ready and while stopping."""
    with pytest.raises(Conflict, match="'hibernate' is not allowed"):
        next_state(state, Event.HIBERNATE)


@pytest.mark.parametrize("event", [Event.START, Event.READY, Event.HIBERNATE, Event.STOPPED])
def test_hibernated_leaves_only_by_resume_stop_or_fail(event: Event) -> None:
    """A hibernated session is not started, made ready or stopped-done without its resume or
    stop; the refusal names what is allowed."""
    with pytest.raises(Conflict, match="allowed: fail, resume, stop"):
        next_state(State.HIBERNATED, event)


def test_hibernated_counts_as_active() -> None:
    """A hibernated session holds its place in the limits and is recovered after a restart."""
    assert State.HIBERNATED in ACTIVE_STATES
    assert not is_final(State.HIBERNATED)
