"""Counters a manager exposes through ``stats()``; plain data, no I/O.

Every key is bounded: refusals count by :class:`~.refusals.RefusalKind` (a
fixed set), frames by message type (only types that decoded, i.e. registered
classes), never by text a peer chose.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from .refusals import RefusalKind

__all__ = ["Stats"]


class Stats:
    """Frames in and out per type, refusals per kind, connection counts."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.frames_in: Counter[str] = Counter()
        self.frames_out: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.connections_total = 0
        self.reconnects = 0
        self.dropped_broadcasts = 0
        self.paced_frames = 0
        """Frames read late because their peer was above its rate (backpressure)."""

    def reject(self, kind: RefusalKind) -> None:
        self.rejections[kind.key] += 1

    def snapshot(self, connections: int) -> dict[str, Any]:
        return {
            "connections": connections,
            "connections_total": self.connections_total,
            "frames_in": dict(self.frames_in),
            "frames_out": dict(self.frames_out),
            "rejections": dict(self.rejections),
            "reconnects": self.reconnects,
            "dropped_broadcasts": self.dropped_broadcasts,
            "paced_frames": self.paced_frames,
            "uptime": time.monotonic() - self.started,
        }
