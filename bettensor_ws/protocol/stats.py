"""Counters a manager exposes through ``stats()``; plain data, no I/O."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

__all__ = ["Stats"]


class Stats:
    """Frames in and out per type, rejections per reason, connection counts."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.frames_in: Counter[str] = Counter()
        self.frames_out: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.connections_total = 0
        self.reconnects = 0
        self.dropped_broadcasts = 0

    def reject(self, reason: str) -> None:
        # Reasons can carry details after a colon or parenthesis; count by kind.
        self.rejections[reason.split(":")[0].split(" (")[0]] += 1

    def snapshot(self, connections: int) -> dict[str, Any]:
        return {
            "connections": connections,
            "connections_total": self.connections_total,
            "frames_in": dict(self.frames_in),
            "frames_out": dict(self.frames_out),
            "rejections": dict(self.rejections),
            "reconnects": self.reconnects,
            "dropped_broadcasts": self.dropped_broadcasts,
            "uptime": time.monotonic() - self.started,
        }
