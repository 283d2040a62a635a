"""Headless runs, the pure part: their lifecycle, the quota's periods, what a prompt may be.

A run is one prompt given to a provider's non-interactive command (``POST /api/runs``); the
controller's :mod:`remotecli.controller.runs` drives it, :mod:`remotecli.run_formats` reads its
output. Everything that decides a run's state lives in the one table here, as the session's does
in :mod:`remotecli.states`, and the store applies it inside its transaction. ::

    queued ──start──▶ running ──exit 0──▶ done
       │                 │
       │                 ├──exit ≠ 0, timeout, driver error──▶ failed
       ├──fail───────────┼──────────────────────────────────▶ failed
       └──cancel─────────┴──────────────────────────────────▶ cancelled

``done``, ``failed`` and ``cancelled`` are final. A run is ``queued`` while its sandbox starts.

The quota counts per user and per *period*: a calendar month, week (from Monday) or day, in
UTC. :func:`period_bounds` says which period a moment falls in; its end is the ``Retry-After``
of a run refused for the quota.
"""

from __future__ import annotations

import calendar
import math
import unicodedata
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from remotecli.exceptions import Conflict, Unprocessable


class RunState(StrEnum):
    """Where a run is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunStep(StrEnum):
    """What happens to a run: the steps of its lifecycle."""

    START = "start"  # the command started in its sandbox
    FINISH = "finish"  # the command exited with status 0
    FAIL = "fail"  # it exited otherwise, timed out, or could not start; a reason comes with it
    CANCEL = "cancel"  # its owner cancelled it, or the controller shut down


FINAL_RUN_STATES = frozenset({RunState.DONE, RunState.FAILED, RunState.CANCELLED})
ACTIVE_RUN_STATES = frozenset({RunState.QUEUED, RunState.RUNNING})

_TRANSITIONS: dict[tuple[RunState, RunStep], RunState] = {
    (RunState.QUEUED, RunStep.START): RunState.RUNNING,
    (RunState.QUEUED, RunStep.FAIL): RunState.FAILED,
    (RunState.QUEUED, RunStep.CANCEL): RunState.CANCELLED,
    (RunState.RUNNING, RunStep.FINISH): RunState.DONE,
    (RunState.RUNNING, RunStep.FAIL): RunState.FAILED,
    (RunState.RUNNING, RunStep.CANCEL): RunState.CANCELLED,
}


def next_run_state(current: RunState, step: RunStep) -> RunState:
    """Return the state ``step`` moves a run in ``current`` to; Conflict (409) if it may not."""
    following = _TRANSITIONS.get((current, step))
    if following is None:
        raise Conflict(f"a {current.value} run cannot {step.value}", state=current.value)
    return following


PROMPT_MAX = 65536
"""Characters a prompt may have: an argument of a Linux command line is at most 128 KiB."""


def check_prompt(prompt: str) -> str:
    """Return ``prompt`` if a command line can carry it; Unprocessable (422) saying why not.

    It must not be blank, hold a NUL (no argument can) or other control characters than tab,
    newline and carriage return, and must be at most :data:`PROMPT_MAX` characters.
    """
    if not prompt.strip():
        raise Unprocessable("the prompt is empty; write what the CLI should do")
    if len(prompt) > PROMPT_MAX:
        raise Unprocessable(
            f"the prompt has {len(prompt)} characters, more than the {PROMPT_MAX} a run takes; "
            "shorten it, or put the text in a file of a session",
            limit=PROMPT_MAX,
        )
    bad = next((c for c in prompt if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
    if bad is not None:
        raise Unprocessable(
            f"the prompt holds the control character U+{ord(bad):04X}; only tab, newline and "
            "carriage return are taken"
        )
    return prompt


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """Return the start and end (UNIX seconds) of the ``period`` (month, week, day) holding
    ``now``, in UTC; the end is the next period's start."""
    moment = datetime.fromtimestamp(now, UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = day.replace(day=1)
        end = start + timedelta(days=calendar.monthrange(start.year, start.month)[1])
    else:
        raise ValueError(f"unknown quota period {period!r}")
    return start.timestamp(), end.timestamp()


def seconds_until(moment: float, now: float) -> int:
    """Return whole seconds from ``now`` to ``moment``, at least 1 (a ``Retry-After``)."""
    return max(1, math.ceil(moment - now))
