"""The one worker thread that every store call of a node runs on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

__all__ = ["DbThread"]

T = TypeVar("T")


class DbThread:
    """Runs a store's synchronous calls on one worker thread, one at a time.

    One thread keeps SQLite's single-writer model and the rules' view of the
    data consistent, and keeps disk syncs off the Trio loop.
    """

    def __init__(self) -> None:
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
