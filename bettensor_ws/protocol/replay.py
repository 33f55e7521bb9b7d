"""Replay protection: each (sender, nonce) once, and only near the present."""

from __future__ import annotations

import heapq
import time
from datetime import UTC, datetime

from .refusals import Refusal, RefusalKind

__all__ = ["ReplayGuard", "parse_timestamp", "window_refusal"]


def parse_timestamp(value: str) -> float:
    """Epoch seconds of an ISO-8601 timestamp; a naive one is taken as UTC."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def window_refusal(sent_at: float, now: float, window: float) -> Refusal | None:
    """Why a timestamp ``sent_at`` is not within ``window`` seconds of ``now``, if it is not."""
    if sent_at < now - window:
        return Refusal(RefusalKind.STALE_TIMESTAMP, f"{now - sent_at:.0f}s old")
    if sent_at > now + window:
        return Refusal(RefusalKind.FUTURE_TIMESTAMP, f"{sent_at - now:.0f}s ahead")
    return None


class ReplayGuard:
    """Remembers nonces for as long as their timestamps could still be accepted.

    A (sender, nonce) pair can be forgotten once its timestamp has fallen out of
    the window, because the timestamp check alone then refuses it; so memory is
    bounded by the rate of accepted messages times the window. ``max_entries``
    caps it outright: when full, new nonces are refused rather than old ones
    forgotten (fail closed).
    """

    def __init__(self, window: float = 300.0, *, max_entries: int = 1_000_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._seen: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, str, str]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, sender: str, nonce: str, timestamp: str, *, now: float | None = None) -> Refusal | None:
        """Record the pair and return None if acceptable, else why it is not."""
        now = time.time() if now is None else now
        try:
            sent_at = parse_timestamp(timestamp)
        except (ValueError, TypeError, OverflowError):
            return Refusal(RefusalKind.MALFORMED_TIMESTAMP)
        refusal = window_refusal(sent_at, now, self.window)
        if refusal is not None:
            return refusal
        self.prune(now)
        key = (sender, nonce)
        if key in self._seen:
            return Refusal(RefusalKind.REPLAYED_NONCE)
        if len(self._seen) >= self.max_entries:
            return Refusal(RefusalKind.REPLAY_GUARD_FULL)
        expires = sent_at + self.window
        self._seen[key] = expires
        heapq.heappush(self._expiry, (expires, sender, nonce))
        return None

    def prune(self, now: float) -> None:
        """Forget every pair whose timestamp is now outside the window."""
        expiry = self._expiry
        while expiry and expiry[0][0] < now:
            _, sender, nonce = heapq.heappop(expiry)
            self._seen.pop((sender, nonce), None)
