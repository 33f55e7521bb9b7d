"""Replay protection: each (sender, nonce) once, and only near the present.

Three promises, each against a way the guard used to be beaten:

- **Per-sender quota.** One sender may hold at most ``per_sender`` entries; past
  that it alone is refused ("replay quota exceeded"), so a peer stamping its
  frames far in the future fills its own share, not everyone's.
- **Clocks that step.** An entry is forgotten only when both the wall clock
  (``now``, epoch seconds) and a monotonic clock (``mono``) say its timestamp
  has left the window. A wall clock stepped forward cannot empty the guard;
  one stepped back finds the entries still there.
- **Restarts.** New entries can be journalled (:meth:`take_journal`) for the
  owner to store, and stored ones reloaded (:meth:`load`): the node keeps them
  in SQLite, so a frame used before a restart is still refused after it.

Memory: a nonce is kept as a 60-bit digest (in a set, and in an array per
second of its timestamp), never as the text, whose length the sender chose
(and which is refused past :data:`MAX_NONCE` characters): about 80 bytes an
entry, 1.3 MB for a sender at the default quota (measured by
``tests/test_security_replay.py``).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
from array import array
from collections.abc import Iterable
from datetime import UTC, datetime

from .refusals import Refusal, RefusalKind

__all__ = [
    "MAX_NONCE",
    "PER_SENDER",
    "ReplayGuard",
    "check_nonce",
    "nonce_digest",
    "parse_timestamp",
    "window_refusal",
]

MAX_NONCE = 128
"""Longest nonce (and message type) accepted, in characters; ours are 32, the reference's 36."""

PER_SENDER = 16_384
"""Default entries one sender may hold: a peer at the validator's rate limit (50 frames
a second) with honest timestamps holds 15,000 (50 x 300 s)."""

MAX_SENDERS_AT_QUOTA = 256
"""A subnet has at most 256 UIDs: the default total lets every one of them sit at its quota."""

JournalRow = tuple[str, int, int]
"""(sender, second of the timestamp, digest of the nonce): what is stored to survive a restart."""


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


def check_nonce(nonce: object) -> Refusal | None:
    """Why ``nonce`` cannot be a nonce (not a string, or longer than :data:`MAX_NONCE`)."""
    if not isinstance(nonce, str):
        return Refusal(RefusalKind.MALFORMED, "nonce: expected a string")
    if len(nonce) > MAX_NONCE:
        return Refusal(RefusalKind.MALFORMED, f"nonce: longer than {MAX_NONCE} characters")
    return None


def nonce_digest(nonce: str, scope: str = "") -> int:
    """A 60-bit digest of ``nonce`` in ``scope``: stable across restarts, small in memory."""
    text = f"{scope}\0{nonce}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 4


class _Ledger:
    """One sender's entries: the digests it holds, and per second of timestamps an
    array of the same digests (8 bytes each), to forget them a second at a time."""

    __slots__ = ("buckets", "seen")

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.buckets: dict[int, array[int]] = {}


class ReplayGuard:
    """Remembers nonces for as long as their timestamps could still be accepted.

    A (sender, nonce) pair can be forgotten once its timestamp has fallen out of
    the window, because the timestamp check alone then refuses it. Entries are
    kept per second of their timestamp and forgotten a bucket at a time, up to
    a second after the window. ``per_sender`` bounds what one sender holds,
    ``max_entries`` the total; either refuses (fails closed), never forgets early.
    """

    def __init__(
        self,
        window: float = 300.0,
        *,
        per_sender: int = PER_SENDER,
        max_entries: int = PER_SENDER * MAX_SENDERS_AT_QUOTA,
    ) -> None:
        if not window > 0 or per_sender < 1 or max_entries < 1:
            raise ValueError("window must be positive, per_sender and max_entries at least 1")
        self.window = window
        self.per_sender = per_sender
        self.max_entries = max_entries
        self._ledgers: dict[str, _Ledger] = {}
        self._total = 0
        # one item per live (sender, second): (monotonic expiry, wall expiry, sender, second)
        self._expiry: list[tuple[float, float, str, int]] = []
        self._journal: list[JournalRow] | None = None

    def __len__(self) -> int:
        return self._total

    def held_by(self, sender: str) -> int:
        """Entries ``sender`` holds now (its share of the guard)."""
        ledger = self._ledgers.get(sender)
        return len(ledger.seen) if ledger is not None else 0

    @property
    def senders(self) -> int:
        return len(self._ledgers)

    def check(
        self,
        sender: str,
        nonce: str,
        timestamp: str,
        *,
        now: float | None = None,
        mono: float | None = None,
        scope: str = "",
    ) -> Refusal | None:
        """Record the pair and return None if acceptable, else why it is not.

        ``now`` is the wall clock (epoch seconds) the window is judged by;
        ``mono`` a monotonic clock for forgetting (``time.monotonic()`` unless
        given: pass a simulated one beside a simulated ``now``). ``scope``
        separates nonce spaces (auth frames from envelopes).
        """
        now = time.time() if now is None else now
        mono = time.monotonic() if mono is None else mono
        refusal = check_nonce(nonce)
        if refusal is not None:
            return refusal
        try:
            sent_at = parse_timestamp(timestamp)
        except (ValueError, TypeError, OverflowError):
            return Refusal(RefusalKind.MALFORMED_TIMESTAMP)
        refusal = window_refusal(sent_at, now, self.window)
        if refusal is not None:
            return refusal
        self.prune(now, mono)
        digest = nonce_digest(nonce, scope)
        ledger = self._ledgers.get(sender)
        if ledger is not None and digest in ledger.seen:
            return Refusal(RefusalKind.REPLAYED_NONCE)
        if ledger is not None and len(ledger.seen) >= self.per_sender:
            return Refusal(RefusalKind.REPLAY_QUOTA, str(self.per_sender))
        if self._total >= self.max_entries:
            return Refusal(RefusalKind.REPLAY_GUARD_FULL)
        second = math.floor(sent_at)
        self._add(sender, digest, second, now, mono)
        if self._journal is not None:
            self._journal.append((sender, second, digest))
        return None

    def _add(self, sender: str, digest: int, second: int, now: float, mono: float) -> None:
        ledger = self._ledgers.get(sender)
        if ledger is None:
            ledger = self._ledgers[sender] = _Ledger()
        bucket = ledger.buckets.get(second)
        if bucket is None:
            bucket = ledger.buckets[second] = array("Q")
            wall_expiry = second + 1 + self.window
            heapq.heappush(self._expiry, (mono + (wall_expiry - now), wall_expiry, sender, second))
        bucket.append(digest)
        ledger.seen.add(digest)
        self._total += 1

    def prune(self, now: float, mono: float | None = None) -> None:
        """Forget every bucket whose timestamps are out of the window by both clocks."""
        mono = time.monotonic() if mono is None else mono
        expiry = self._expiry
        while expiry and expiry[0][0] <= mono:
            _, wall_expiry, sender, second = heapq.heappop(expiry)
            if wall_expiry > now:
                # the wall clock says not yet (it is behind): keep it, fail closed, and
                # look again when the wall clock should get there; the rest go on
                heapq.heappush(expiry, (mono + (wall_expiry - now), wall_expiry, sender, second))
                continue
            ledger = self._ledgers[sender]
            held = len(ledger.seen)
            ledger.seen.difference_update(ledger.buckets.pop(second))
            self._total -= held - len(ledger.seen)
            if not ledger.seen:
                del self._ledgers[sender]

    # ---- surviving a restart -----------------------------------------------------------------

    def journal(self) -> None:
        """Start keeping every new entry for :meth:`take_journal` (the owner drains it)."""
        if self._journal is None:
            self._journal = []

    def take_journal(self) -> list[JournalRow]:
        """The entries added since the last call, to be stored."""
        rows, self._journal = self._journal or [], ([] if self._journal is not None else None)
        return rows

    def requeue(self, rows: list[JournalRow]) -> None:
        """Give back rows :meth:`take_journal` returned that could not be stored,
        to be taken again (first) next time."""
        if self._journal is not None:
            self._journal[:0] = rows

    def load(self, rows: Iterable[JournalRow], *, now: float, mono: float) -> int:
        """Take back stored entries still inside the window; returns how many."""
        loaded = 0
        for sender, second, digest in rows:
            if second + 1 + self.window <= now:
                continue
            ledger = self._ledgers.get(sender)
            if ledger is not None and digest in ledger.seen:
                continue
            self._add(sender, int(digest), int(second), now, mono)
            loaded += 1
        return loaded
