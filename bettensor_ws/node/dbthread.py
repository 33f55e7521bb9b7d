"""The worker threads that every store call of a node runs on."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

__all__ = ["DbThread"]

T = TypeVar("T")


class DbThread:
    """Runs a store's synchronous calls on worker threads, in two lanes.

    The main lane (:meth:`run`) takes every call one at a time: it keeps
    SQLite's single-writer model and the rules' view of the data consistent,
    and keeps disk syncs off the Trio loop. The decision lane is a group
    committer's (:class:`GroupCommitter` with a write step): its decisions run
    beside the main lane's write of the group before, on the store's second
    connection. :meth:`run_exclusive`
    holds both, for a call that changes what decisions read (new games).

    Each lane is a lock taken on the worker thread (so that a committer's own
    long-running threads share it) behind a one-slot limiter (so that callers
    waiting for a lane wait in Trio, not as blocked threads).
    """

    def __init__(self) -> None:
        self.main_lock = threading.Lock()
        self.decision_lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._decision = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(_locked, (self.main_lock,), fn, args, limiter=self._limiter)

    async def run_exclusive(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._decision:
            return await trio.to_thread.run_sync(
                _locked, (self.decision_lock, self.main_lock), fn, args, limiter=self._limiter
            )


def _locked(locks: tuple[threading.Lock, ...], fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    for lock in locks:
        lock.acquire()
    try:
        return fn(*args)
    finally:
        for lock in reversed(locks):
            lock.release()
