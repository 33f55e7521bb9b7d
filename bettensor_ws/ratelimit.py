"""A token bucket per connection; time is passed in, so it is tested without a clock."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up.

    ``strikes`` is refusals minus accepted takes (never below zero), so a caller
    can tell a burst that overran from a peer that keeps flooding: a flooder
    gets far more refusals than the rate lets through and its strikes climb,
    where resetting on every accepted take would forgive it each refill.
    """

    __slots__ = ("rate", "burst", "tokens", "updated", "strikes")

    def __init__(self, rate: float, burst: int, *, now: float = 0.0) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now
        self.strikes = 0

    def take(self, now: float, n: int = 1) -> bool:
        """Spend ``n`` tokens if there are that many; False (and a strike) if not."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
            self.updated = now
        if self.tokens >= n:
            self.tokens -= n
            if self.strikes:
                self.strikes -= 1
            return True
        self.strikes += 1
        return False
