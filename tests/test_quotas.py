"""Per-user quotas (remotecli.quotas): the creation token bucket and the fair share, fed values."""

from __future__ import annotations

import pytest

from remotecli.exceptions import TooManyRequests
from remotecli.quotas import CreationRate, describe_rate, fair_share


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refuses_with_a_retry_time() -> None:
    """Ten creations pass at once; the eleventh is 429 with Retry-After 3 s and the limit named."""
    rate = CreationRate(10, 30.0, clock=FakeClock())
    for _ in range(10):
        rate.take("alice")
    with pytest.raises(TooManyRequests) as caught:
        rate.take("alice")
    assert caught.value.status == 429
    assert caught.value.data["retry_after"] == 3
    assert "10 per 30 s" in caught.value.message
    assert "REMOTECLI_CREATE_RATE" in caught.value.message


def test_bucket_refills_at_its_rate_and_never_above_its_burst() -> None:
    """After the burst, one creation comes back every period/burst seconds, up to the burst."""
    clock = FakeClock()
    rate = CreationRate(2, 10.0, clock=clock)
    rate.take("alice")
    rate.take("alice")
    clock.now += 4.9
    with pytest.raises(TooManyRequests):
        rate.take("alice")
    clock.now += 0.1
    rate.take("alice")
    clock.now += 3600
    rate.take("alice")
    rate.take("alice")
    with pytest.raises(TooManyRequests):
        rate.take("alice")


def test_bucket_is_per_user() -> None:
    """One user's spent burst does not slow another user down."""
    rate = CreationRate(1, 60.0, clock=FakeClock())
    rate.take("alice")
    with pytest.raises(TooManyRequests):
        rate.take("alice")
    rate.take("bob")


def test_only_spent_creations_count() -> None:
    """A creation checked but not accepted (the store failed) leaves the allowance untouched."""
    rate = CreationRate(1, 60.0, clock=FakeClock())
    for _ in range(5):
        rate.check("alice")
    rate.spend("alice")
    with pytest.raises(TooManyRequests):
        rate.check("alice")


def test_a_clock_going_back_does_not_spend_tokens() -> None:
    """A wall clock stepping backwards neither refills nor drains the bucket."""
    clock = FakeClock()
    rate = CreationRate(2, 10.0, clock=clock)
    rate.take("alice")
    clock.now -= 100
    rate.take("alice")


@pytest.mark.parametrize(
    ("max_sessions", "per_user", "others", "share"),
    [
        (20, 10, 0, 10),  # alone: half the host (and the per-user limit)
        (20, 10, 1, 6),  # two users hold at most 10 + 6 < 20
        (20, 10, 2, 5),
        (20, 10, 8, 2),
        (20, 10, 18, 1),
        (20, 10, 19, 0),
        (20, 4, 0, 4),  # the per-user limit binds first
        (3, 2, 0, 1),
    ],
)
def test_fair_share(max_sessions: int, per_user: int, others: int, share: int) -> None:
    """The share is min(per user, max // (others + 2)): two users can never fill the host."""
    assert fair_share(max_sessions, per_user, others) == share


def test_two_users_never_fill_the_host() -> None:
    """For any cap, the first user's share plus the second's leaves at least one place free."""
    for cap in range(1, 200):
        first = fair_share(cap, cap, 0)
        second = fair_share(cap, cap, 1)
        assert first + second < cap


def test_rates_are_described_as_written() -> None:
    """The limit is named in the unit it was most likely configured in."""
    assert describe_rate(10, 30.0) == "10 per 30 s"
    assert describe_rate(20, 60.0) == "20 per 1 min"
    assert describe_rate(100, 7200.0) == "100 per 2 h"
