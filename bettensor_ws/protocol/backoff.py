"""Reconnect delays: exponential, with full jitter, reset once a link has held."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delay before attempt n is uniform in [base, min(max, base * 2**n)].

    Full jitter spreads a crowd of miners that lost the same validator at once.
    """

    def __init__(self, base: float, maximum: float, *, rng: random.Random | None = None) -> None:
        if base <= 0 or maximum < base:
            raise ValueError("need 0 < base <= maximum")
        self.base = base
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.base * 2 ** min(self.failures, 32))
        self.failures += 1
        return self._rng.uniform(self.base, ceiling)

    def reset(self) -> None:
        self.failures = 0
