"""The pure part of headless runs: the lifecycle table, the prompt's rules, the quota's periods."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from remotecli.exceptions import Conflict, Unprocessable
from remotecli.runs import (
    ACTIVE_RUN_STATES,
    FINAL_RUN_STATES,
    PROMPT_MAX,
    RunState,
    RunStep,
    check_prompt,
    next_run_state,
    period_bounds,
    seconds_until,
)


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_a_run_goes_from_queued_through_running_to_one_end() -> None:
    """queued starts running; running ends done, failed or cancelled; queued may fail or cancel."""
    assert next_run_state(RunState.QUEUED, RunStep.START) is RunState.RUNNING
    assert next_run_state(RunState.RUNNING, RunStep.FINISH) is RunState.DONE
    assert next_run_state(RunState.RUNNING, RunStep.FAIL) is RunState.FAILED
    assert next_run_state(RunState.RUNNING, RunStep.CANCEL) is RunState.CANCELLED
    assert next_run_state(RunState.QUEUED, RunStep.FAIL) is RunState.FAILED
    assert next_run_state(RunState.QUEUED, RunStep.CANCEL) is RunState.CANCELLED


@pytest.mark.parametrize("state", sorted(FINAL_RUN_STATES))
@pytest.mark.parametrize("step", list(RunStep))
def test_an_ended_run_takes_no_step(state: RunState, step: RunStep) -> None:
    """Nothing leaves done, failed or cancelled: every step is a 409 Conflict."""
    with pytest.raises(Conflict):
        next_run_state(state, step)


def test_a_queued_run_cannot_finish_without_starting() -> None:
    """A run whose command never started cannot be done, and a running one cannot start again."""
    with pytest.raises(Conflict):
        next_run_state(RunState.QUEUED, RunStep.FINISH)
    with pytest.raises(Conflict):
        next_run_state(RunState.RUNNING, RunStep.START)
    assert ACTIVE_RUN_STATES.isdisjoint(FINAL_RUN_STATES)


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ("", "empty"),
        (" \n\t", "empty"),
        ("a\x00b", "U+0000"),
        ("a\x1bb", "U+001B"),
        ("a\x7fb", "U+007F"),
        ("x" * (PROMPT_MAX + 1), "characters"),
    ],
)
def test_prompts_a_command_line_cannot_carry_are_refused(prompt: str, words: str) -> None:
    """Blank prompts, control characters and over-long prompts are 422 naming the cause."""
    with pytest.raises(Unprocessable) as refused:
        check_prompt(prompt)
    assert words in refused.value.message


@pytest.mark.parametrize("prompt", ["--version", "line one\nline two\r\n\tindented", "é 漢字 🙂"])
def test_prompts_with_text_of_any_kind_are_taken_whole(prompt: str) -> None:
    """Options, newlines, tabs and any script are taken as they are."""
    assert check_prompt(prompt) == prompt


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("day", "2026-11-26T22:00:00", "2026-11-26T00:00:00", "2026-11-27T00:00:00"),
        ("week", "2026-11-26T22:00:00", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),
        ("week", "2026-11-23T00:00:00", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),
        ("month", "2026-11-26T22:00:00", "2026-11-01T00:00:00", "2026-12-01T00:00:00"),
        ("month", "2026-12-31T23:59:59", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ("month", "2028-02-15T12:00:00", "2028-02-01T00:00:00", "2028-03-01T00:00:00"),
    ],
)
def test_periods_are_calendar_periods_in_utc(period: str, now: str, start: str, end: str) -> None:
    """A day, a week from Monday and a month (leap Februaries, the year's end) in UTC."""
    assert period_bounds(period, at(now)) == (at(start), at(end))


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    """The wait to a moment is rounded up, and never 0 (a client would retry at once)."""
    assert seconds_until(100.2, 99.0) == 2
    assert seconds_until(100.0, 100.0) == 1
    assert seconds_until(50.0, 100.0) == 1
