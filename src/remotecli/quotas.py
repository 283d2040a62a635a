"""Per-user quotas on sessions: how fast one may create them, and how many one may hold.

Pure: time comes from an injected clock, counts from the caller. The session manager asks
both before it creates a session, after the fixed limits (``max_sessions_per_user`` and the
host's ``max_sessions``) passed.

- **Creation rate**: a token bucket per user. A user may create ``burst`` sessions at once and
  then one more every ``period / burst`` seconds (``create_rate = "10/30s"``: 10 at once, then
  one per 3 s). Only creations that are accepted take a token, so a refused attempt costs the
  user nothing. This stops one user's create/delete churn from slowing everyone's API.
- **Fair share** of the host's cap: a user may hold at most ::

      min(max_sessions_per_user, max_sessions // (other users with active sessions + 2))

  active sessions. The ``+ 2`` counts the user asking and one newcomer not here yet, so the
  users present always leave room: two users can never fill the host, and a user who has no
  session yet finds a free place until about ``max_sessions / 2`` users hold sessions.
  Sessions already held are never taken away when more users arrive; the share only bounds
  new creations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from remotecli.exceptions import TooManyRequests

Clock = Callable[[], float]


def fair_share(max_sessions: int, max_per_user: int, other_users: int) -> int:
    """Return how many active sessions a user may hold while ``other_users`` others hold some."""
    return min(max_per_user, max_sessions // (other_users + 2))


def describe_duration(seconds: float) -> str:
    """Say a duration the way a person would (``1 h``, ``30 min``, ``45 s``)."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def describe_rate(burst: int, period: float) -> str:
    """Say a rate the way the setting is written (``10 per 30 s``, ``20 per 1 min``)."""
    return f"{burst} per {describe_duration(period)}"


@dataclass
class _Bucket:
    tokens: float
    updated: float


class CreationRate:
    """A token bucket per user: ``burst`` creations at once, refilled at ``burst`` per ``period``.

    Call :meth:`check` before creating (it raises :class:`TooManyRequests`, 429 with
    ``retry_after``, when the user has no token left) and :meth:`spend` once the creation was
    accepted, so a creation that fails for another reason costs nothing.
    """

    def __init__(self, burst: int, period: float, clock: Clock = time.monotonic) -> None:
        self.burst = burst
        self.period = period
        self._per_second = burst / period
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def check(self, user: str) -> None:
        """Raise TooManyRequests, saying when to retry, unless ``user`` may create one now."""
        bucket = self._refilled(user)
        if bucket.tokens >= 1.0:
            return
        retry = max(1, math.ceil((1.0 - bucket.tokens) / self._per_second))
        limit = describe_rate(self.burst, self.period)
        raise TooManyRequests(
            f"you are creating sessions too fast: the limit is {limit} per user; try again "
            f"in {retry} s (operators: REMOTECLI_CREATE_RATE)",
            limit=limit,
            retry_after=retry,
        )

    def spend(self, user: str) -> None:
        """Count one accepted creation of ``user`` (after :meth:`check` let it through)."""
        bucket = self._refilled(user)
        bucket.tokens = max(0.0, bucket.tokens - 1.0)

    def take(self, user: str) -> None:
        """:meth:`check`, then :meth:`spend`: for a creation that cannot fail afterwards."""
        self.check(user)
        self.spend(user)

    def _refilled(self, user: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = self._buckets[user] = _Bucket(float(self.burst), now)
        # max(): a wall clock stepping back neither refills nor drains the bucket
        elapsed = max(0.0, now - bucket.updated)
        bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self._per_second)
        bucket.updated = now
        return bucket
