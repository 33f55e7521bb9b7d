"""Game sources for a real validator: a file re-read when it changes, or an HTTP
endpoint polled; both serve the JSON list of games ``--games`` takes.

A bad update (unreadable, not JSON, not a list of games, an HTTP error) is
refused with a WARNING naming why, and the last good list stays.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import trio

from ..protocol.refusals import bounded
from .feed import load_games_file, parse_games

__all__ = ["DEFAULT_POLL", "GamesFile", "GamesFollower", "GamesSource", "GamesUrl"]

log = logging.getLogger("bettensor_ws.games")

DEFAULT_POLL = 10.0
"""Seconds between two looks at ``--games`` (its mtime and size) or ``--games-url``."""

MAX_BODY = 16 << 20
"""The largest games list an HTTP endpoint may send (bytes)."""

HTTP_TIMEOUT = 10.0

Games = list[dict[str, Any]]


class GamesSource(Protocol):
    label: str

    async def fetch(self, force: bool) -> Games | None:
        """The games, or None when unchanged since the last fetch (unless ``force``);
        ValueError says why an update is refused."""
        ...

    def forget(self) -> None:
        """The last update was not applied: the next fetch reads it again."""
        ...


class GamesFile:
    """``--games FILE``: read again when its mtime, size or inode changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.label = f"games file {self.path}"
        self._stamp: tuple[int, int, int] | None = None

    async def fetch(self, force: bool) -> Games | None:
        return await trio.to_thread.run_sync(self._fetch, force)

    def _fetch(self, force: bool) -> Games | None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise ValueError(f"cannot read {self.label}: {exc.strerror or exc}") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp and not force:
            return None
        # kept even if the content is refused: a bad file is warned about once, not every poll
        self._stamp = stamp
        return load_games_file(self.path)

    def forget(self) -> None:
        self._stamp = None


class GamesUrl:
    """``--games-url URL``: an HTTP(S) endpoint answering the JSON list, polled."""

    def __init__(self, url: str, *, timeout: float = HTTP_TIMEOUT, max_body: int = MAX_BODY) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad --games-url {bounded(url, 100)!r}: expected http(s)://HOST[:PORT]/PATH")
        self.url = url
        self.label = f"games URL {bounded(url, 200)}"
        self.timeout = timeout
        self.max_body = max_body
        self._digest: str | None = None

    async def fetch(self, force: bool) -> Games | None:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=True) as client:
                async with client.stream("GET", self.url, headers={"Accept": "application/json"}) as response:
                    if response.status_code != 200:
                        raise ValueError(f"{self.label} answered HTTP {response.status_code}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > self.max_body:
                            raise ValueError(f"{self.label} sent more than {self.max_body} bytes")
        except httpx.HTTPError as exc:
            raise ValueError(f"cannot fetch {self.label}: {type(exc).__name__}: {bounded(str(exc), 200)}") from None
        digest = hashlib.sha256(body).hexdigest()
        if digest == self._digest and not force:
            return None
        self._digest = digest
        return parse_games(bytes(body), self.label)

    def forget(self) -> None:
        self._digest = None


class GamesFollower:
    """Applies a source's updates: at start, every ``interval`` seconds, and when poked."""

    def __init__(self, source: GamesSource, update: Callable[[Games], Awaitable[object]]) -> None:
        self.source = source
        self._update = update
        self._wake = trio.Event()
        self._force = False
        self._last_problem: str | None = None
        self.applied = 0  # updates applied, for tests and logs

    async def check(self, force: bool = False) -> bool | None:
        """Fetch and apply: True when applied, None when unchanged, False when refused
        (logged; the last good list stays)."""
        try:
            games = await self.source.fetch(force)
        except ValueError as exc:
            self._refused(bounded(str(exc), 500))
            return False
        if games is None:
            return None
        try:
            await self._update(games)
        except sqlite3.Error as exc:
            self.source.forget()  # not stored: read it again next time
            self._refused(f"storing {len(games)} games from {self.source.label} failed ({exc})")
            return False
        self._last_problem = None
        self.applied += 1
        log.info("games reloaded from %s: %d games", self.source.label, len(games))
        return True

    def _refused(self, problem: str) -> None:
        # one WARNING per distinct problem, not one per poll
        level = logging.DEBUG if problem == self._last_problem else logging.WARNING
        self._last_problem = problem
        log.log(level, "games update refused: %s; the last good list stays", problem)

    def poke(self) -> None:
        """Read the source again now, changed or not (SIGHUP)."""
        self._force = True
        self._wake.set()

    async def follow(self, interval: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(interval):
                await self._wake.wait()
            self._wake = trio.Event()
            force, self._force = self._force, False
            await self.check(force)
