"""Tests for :mod:`tunnel2._ratelimit`: the token bucket, sync and with plain numbers (no trio)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel2._ratelimit import TokenBucket


def test_starts_full_and_refuses_when_empty() -> None:
    bucket = TokenBucket(2.0, 3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_refills_at_rate_up_to_burst() -> None:
    bucket = TokenBucket(2.0, 3, now=0.0)
    for _ in range(3):
        assert bucket.take(0.0)
    assert not bucket.take(0.25)  # half a token back
    assert bucket.take(0.5)  # one whole token
    assert not bucket.take(0.5)
    # A long pause refills to burst, not beyond.
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]


def test_a_refused_take_costs_nothing() -> None:
    bucket = TokenBucket(1.0, 1, now=0.0)
    assert bucket.take(0.0)
    for _ in range(100):
        assert not bucket.take(0.5)
    assert bucket.take(1.0)


def test_a_clock_running_back_adds_nothing() -> None:
    bucket = TokenBucket(1.0, 1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (float("nan"), 1)])
def test_rejects_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, burst, now=0.0)


@given(
    rate=st.floats(0.01, 1e6),
    burst=st.integers(1, 1000),
    gaps=st.lists(st.floats(0, 10), min_size=1, max_size=300),
)
def test_never_grants_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    granted = 0
    for gap in gaps:
        now += gap
        granted += bucket.take(now)
        assert granted <= burst + rate * now + 1e-6


@given(
    rate=st.floats(0.01, 1e6),
    burst=st.integers(1, 1000),
    slack=st.lists(st.floats(1.001, 3.0), min_size=1, max_size=300),
)
def test_a_caller_within_the_rate_is_never_refused(
    rate: float, burst: int, slack: list[float]
) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    for factor in slack:
        now += factor / rate
        assert bucket.take(now)
