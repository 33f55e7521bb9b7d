"""TokenBucket with an explicit clock."""

from __future__ import annotations

import pytest

from bettensor_ws import TokenBucket


def test_burst_then_refusal() -> None:
    bucket = TokenBucket(rate=1.0, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [True] * 5
    assert bucket.take(0.0) is False


def test_refill_over_time() -> None:
    bucket = TokenBucket(rate=2.0, burst=4, now=0.0)
    for _ in range(4):
        assert bucket.take(0.0)
    assert not bucket.take(0.0)
    assert not bucket.take(0.25)  # half a token
    assert bucket.take(0.5)  # one token
    assert not bucket.take(0.5)
    assert bucket.take(1.0)
    assert bucket.take(1.5)


def test_refill_is_capped_at_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert bucket.take(0.0)
    # an hour idle saves up no more than the burst
    assert [bucket.take(3600.0) for _ in range(4)] == [True, True, True, False]


def test_take_several_tokens() -> None:
    bucket = TokenBucket(rate=1.0, burst=5, now=0.0)
    assert bucket.take(0.0, n=3)
    assert not bucket.take(0.0, n=3)
    assert bucket.take(0.0, n=2)
    assert bucket.take(3.0, n=3)


def test_clock_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=2, now=10.0)
    assert bucket.take(10.0) and bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


def test_strikes_count_refusals_and_decay_on_success() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=0.0)
    assert bucket.strikes == 0
    assert bucket.take(0.0)
    assert bucket.strikes == 0
    for expected in (1, 2, 3):
        assert not bucket.take(0.1)
        assert bucket.strikes == expected
    assert bucket.take(1.0)
    assert bucket.strikes == 2
    assert bucket.take(2.0) and bucket.take(3.0) and bucket.take(4.0)
    assert bucket.strikes == 0


def test_a_flooder_keeps_its_strikes_across_refills() -> None:
    """50/s, sending 1,000/s: one take in 20 succeeds, strikes still climb."""
    bucket = TokenBucket(rate=50.0, burst=1, now=0.0)
    for i in range(1000):
        bucket.take(i / 1000)
    assert bucket.strikes > 800


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_invalid_parameters(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=rate, burst=burst)
