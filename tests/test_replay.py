"""ReplayGuard: each (sender, nonce) once, only near the present, in bounded memory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from bettensor_ws import Refusal, RefusalKind, ReplayGuard

T0 = 1_725_000_000.0  # a fixed "now", so no test depends on the clock


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def test_fresh_pair_is_accepted_once() -> None:
    guard = ReplayGuard()
    assert guard.check("alice", "n1", iso(T0), now=T0, mono=T0) is None
    assert guard.check("alice", "n1", iso(T0), now=T0 + 1, mono=T0 + 1) == Refusal(RefusalKind.REPLAYED_NONCE)
    assert guard.check("alice", "n1", iso(T0 + 1), now=T0 + 1, mono=T0 + 1) == Refusal(RefusalKind.REPLAYED_NONCE)


def test_same_nonce_from_another_sender_is_a_different_pair() -> None:
    guard = ReplayGuard()
    assert guard.check("alice", "n1", iso(T0), now=T0, mono=T0) is None
    assert guard.check("bob", "n1", iso(T0), now=T0, mono=T0) is None
    assert guard.check("alice", "n2", iso(T0), now=T0, mono=T0) is None


def test_stale_timestamp_is_refused() -> None:
    guard = ReplayGuard(window=300)
    reason = guard.check("alice", "n1", iso(T0 - 301), now=T0, mono=T0)
    assert reason is not None and reason.text().startswith("stale timestamp")
    assert "301s" in reason.text()
    assert guard.check("alice", "n2", iso(T0 - 300), now=T0, mono=T0) is None


def test_future_timestamp_is_refused() -> None:
    guard = ReplayGuard(window=300)
    reason = guard.check("alice", "n1", iso(T0 + 301), now=T0, mono=T0)
    assert reason is not None and reason.text().startswith("future timestamp")
    assert guard.check("alice", "n2", iso(T0 + 300), now=T0, mono=T0) is None


def test_refused_timestamps_are_not_remembered() -> None:
    guard = ReplayGuard(window=300)
    assert guard.check("alice", "n1", iso(T0 + 400), now=T0, mono=T0) is not None
    assert len(guard) == 0
    # once the clock catches up, the same pair is simply fresh
    assert guard.check("alice", "n1", iso(T0 + 400), now=T0 + 200, mono=T0 + 200) is None


def test_window_is_configurable() -> None:
    guard = ReplayGuard(window=10)
    assert guard.check("alice", "n1", iso(T0 - 11), now=T0, mono=T0) is not None
    assert guard.check("alice", "n2", iso(T0 - 9), now=T0, mono=T0) is None


@pytest.mark.parametrize("timestamp", ["", "yesterday", "2024-13-45T00:00:00", "1725000000"])
def test_malformed_timestamp(timestamp: str) -> None:
    guard = ReplayGuard()
    assert guard.check("alice", "n1", timestamp, now=T0, mono=T0) == Refusal(RefusalKind.MALFORMED_TIMESTAMP)
    assert len(guard) == 0


def test_timestamp_offsets_and_naive_utc() -> None:
    guard = ReplayGuard(window=60)
    plus_two = datetime.fromtimestamp(T0, timezone(timedelta(hours=2))).isoformat()
    naive = datetime.fromtimestamp(T0, UTC).replace(tzinfo=None).isoformat()
    zulu = iso(T0).replace("+00:00", "Z")
    assert guard.check("alice", "n1", plus_two, now=T0, mono=T0) is None
    assert guard.check("alice", "n2", naive, now=T0, mono=T0) is None
    assert guard.check("alice", "n3", zulu, now=T0, mono=T0) is None


def test_entries_are_pruned_after_the_window() -> None:
    guard = ReplayGuard(window=300)
    for i in range(10):
        assert guard.check("alice", f"old-{i}", iso(T0), now=T0, mono=T0) is None
    assert len(guard) == 10
    later = T0 + 301
    assert guard.check("alice", "new", iso(later), now=later, mono=later) is None
    assert len(guard) == 1
    # a forgotten pair is still refused, now by its timestamp
    reason = guard.check("alice", "old-0", iso(T0), now=later, mono=later)
    assert reason is not None and reason.text().startswith("stale timestamp")


def test_explicit_prune() -> None:
    guard = ReplayGuard(window=100)
    assert guard.check("alice", "a", iso(T0), now=T0, mono=T0) is None
    assert guard.check("alice", "b", iso(T0 + 50), now=T0 + 50, mono=T0 + 50) is None
    guard.prune(T0 + 101, T0 + 101)
    assert len(guard) == 1
    assert guard.check("alice", "b", iso(T0 + 50), now=T0 + 101, mono=T0 + 101) == Refusal(RefusalKind.REPLAYED_NONCE)
    guard.prune(T0 + 151, T0 + 151)
    assert len(guard) == 0


def test_pair_is_remembered_for_the_whole_window() -> None:
    guard = ReplayGuard(window=100)
    assert guard.check("alice", "n", iso(T0), now=T0, mono=T0) is None
    for step in (1, 50, 99, 100):
        assert guard.check("alice", "n", iso(T0), now=T0 + step, mono=T0 + step) == Refusal(RefusalKind.REPLAYED_NONCE)


def test_memory_stays_bounded_under_fresh_nonces() -> None:
    guard = ReplayGuard(window=10)
    for i in range(2000):
        now = T0 + i  # one message a second
        assert guard.check("alice", f"n{i}", iso(now), now=now, mono=now) is None
        assert len(guard) <= 12


def test_max_entries_fails_closed() -> None:
    guard = ReplayGuard(window=300, max_entries=2)
    assert guard.check("alice", "a", iso(T0), now=T0, mono=T0) is None
    assert guard.check("alice", "b", iso(T0), now=T0, mono=T0) is None
    assert guard.check("alice", "c", iso(T0), now=T0, mono=T0) == Refusal(RefusalKind.REPLAY_GUARD_FULL)
    assert len(guard) == 2
    # replays are still told apart from overflow
    assert guard.check("alice", "a", iso(T0), now=T0, mono=T0) == Refusal(RefusalKind.REPLAYED_NONCE)
    # once the old entries age out there is room again
    later = T0 + 301
    assert guard.check("alice", "c", iso(later), now=later, mono=later) is None
    assert len(guard) == 1
