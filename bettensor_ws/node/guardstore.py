"""The replay guard's memory on disk, so a restart does not reopen recorded frames."""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Protocol

import trio

from ..protocol.replay import JournalRow, ReplayGuard
from .dbthread import DbThread

__all__ = ["GUARD_SAVE_INTERVAL", "GuardKeeper"]

log = logging.getLogger("bettensor_ws.node")

GUARD_SAVE_INTERVAL = 1.0
"""Seconds between saves of new guard entries. Auth nonces are saved at once, before
the Welcome; a message frame accepted in the last second before a crash could be
replayed after it, and would get the answer it got the first time (predictions are
idempotent per miner)."""


class NonceStore(Protocol):
    def save_nonces(self, rows: list[JournalRow], window: float, now: float) -> None: ...

    def load_nonces(self, now: float) -> list[JournalRow]: ...


class GuardKeeper:
    """Loads a node's stored guard entries at start, then saves new ones as they come."""

    def __init__(self, guard: ReplayGuard, store: NonceStore, db: DbThread) -> None:
        self.guard = guard
        self._store = store
        self._db = db
        self.saved = 0

    async def save(self) -> None:
        """Store the entries added since the last save (one transaction)."""
        rows = self.guard.take_journal()
        if not rows:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._db.run(self._store.save_nonces, rows, self.guard.window, time.time())
        except sqlite3.Error as exc:
            # kept (in memory they still refuse replays) and saved with the next batch
            self.guard.requeue(rows)
            log.warning("saving %d replay-guard entries failed (%s); retrying", len(rows), exc)
            return
        self.saved += len(rows)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, start journalling, then save every :data:`GUARD_SAVE_INTERVAL` until cancelled
        (and once more, shielded, on the way out)."""
        rows = await self._db.run(self._store.load_nonces, time.time())
        loaded = self.guard.load(rows, now=time.time(), mono=trio.current_time())
        if loaded:
            log.info("replay guard: %d entries from before the restart", loaded)
        self.guard.journal()
        task_status.started()
        try:
            while True:
                await trio.sleep(GUARD_SAVE_INTERVAL)
                await self.save()
        finally:
            with trio.CancelScope(shield=True):
                await self.save()
