"""A token bucket per connection and a cooldown list of flooders; time is passed in,
so both are tested without a clock."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["Budgets", "FloodCooldown", "TokenBucket"]


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

    def wait_for(self, now: float, n: int = 1) -> float:
        """Seconds until ``n`` tokens are there (0 if they are now)."""
        tokens = min(float(self.burst), self.tokens + max(0.0, now - self.updated) * self.rate)
        return max(0.0, (n - tokens) / self.rate)

    def take(self, now: float, n: int = 1) -> bool:
        """Spend ``n`` tokens if there are that many; False (and a strike) if not."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
            self.updated = now
        if self.tokens >= n - 1e-9:  # a paced reader wakes exactly at the refill
            self.tokens -= n
            if self.strikes:
                self.strikes -= 1
            return True
        self.strikes += 1
        return False


class FloodCooldown:
    """Hotkeys closed for flooding, refused for ``seconds`` afterwards.

    A flooder closed by the strike rule that reconnects at once would get a
    fresh bucket and cost a full handshake (upgrade, sr25519 verify, welcome)
    plus a burst of refused frames every time; remembering it turns each retry
    into a cheap refusal. Memory is bounded: entries expire, and past
    ``max_entries`` the oldest ban is forgotten (a ban is a saving, not a
    guarantee, so dropping one early is safe).
    """

    __slots__ = ("seconds", "max_entries", "_until")

    def __init__(self, seconds: float, *, max_entries: int = 10_000) -> None:
        if seconds < 0 or max_entries < 1:
            raise ValueError("seconds must be at least 0 and max_entries at least 1")
        self.seconds = seconds
        self.max_entries = max_entries
        # hotkey -> end of its cooldown; every ban lasts ``seconds``, so insertion
        # order (a re-ban moves to the end) is also expiry order
        self._until: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def ban(self, hotkey: str, now: float) -> None:
        """Refuse ``hotkey`` until ``now + seconds`` (no-op when disabled)."""
        if self.seconds <= 0:
            return
        self.prune(now)
        self._until[hotkey] = now + self.seconds
        self._until.move_to_end(hotkey)
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def remaining(self, hotkey: str, now: float) -> float | None:
        """Seconds left in ``hotkey``'s cooldown, or None when it may connect."""
        until = self._until.get(hotkey)
        if until is None:
            return None
        if until <= now:
            del self._until[hotkey]
            return None
        return until - now

    def prune(self, now: float) -> None:
        """Forget every ban that has ended."""
        until = self._until
        while until:
            hotkey, end = next(iter(until.items()))
            if end > now:
                return
            del until[hotkey]


class Budgets:
    """One :class:`TokenBucket` per hotkey, kept across that hotkey's connections.

    A budget that lived and died with a connection was reset by reconnecting:
    fresh connections with a burst each let one hotkey send 70 times its rate.
    Bounded: past ``max_hotkeys`` the least recently used budget is forgotten
    (only verified hotkeys get one, and a subnet has 256 UIDs).
    """

    __slots__ = ("rate", "burst", "max_hotkeys", "_buckets")

    def __init__(self, rate: float, burst: int, *, max_hotkeys: int = 16_384) -> None:
        if rate <= 0 or burst < 1 or max_hotkeys < 1:
            raise ValueError("rate must be positive, burst and max_hotkeys at least 1")
        self.rate = rate
        self.burst = burst
        self.max_hotkeys = max_hotkeys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, hotkey: str, now: float) -> TokenBucket:
        """``hotkey``'s bucket (a full one the first time it is asked for)."""
        bucket = self._buckets.get(hotkey)
        if bucket is None:
            bucket = self._buckets[hotkey] = TokenBucket(self.rate, self.burst, now=now)
            while len(self._buckets) > self.max_hotkeys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(hotkey)
        return bucket
