"""What validator and miner managers share: handlers, hooks, connections, stats."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from trio_websocket import WebSocketConnection

from ..protocol.dispatch import Dispatcher, Handler
from ..protocol.replay import ReplayGuard
from ..protocol.signing import Signer
from ..protocol.stats import Stats
from .connection import CLOSE_INTERNAL, Connection, ConnectionSettings, LinkClosed

__all__ = ["ConnectHook", "Manager"]

log = logging.getLogger("bettensor_ws.manager")

ConnectHook = Callable[[Connection], Awaitable[None]]


class Manager:
    """The common half of both managers; each side adds how links are made."""

    def __init__(
        self,
        keypair: Signer,
        *,
        settings: ConnectionSettings,
        replay_window: float,
        features: Iterable[str],
    ) -> None:
        self.keypair = keypair
        self.hotkey: str = keypair.ss58_address
        self.settings = settings
        self.features = tuple(features)
        self.dispatcher = Dispatcher()
        self.guard = ReplayGuard(replay_window)
        self._stats = Stats()
        self._connections: dict[str, Connection] = {}
        self._connect_hooks: list[ConnectHook] = []

    def register_handler(self, message_type: str, handler: Handler) -> None:
        """Handle ``message_type`` with ``async def handler(websocket, message)``."""
        self.dispatcher.register_handler(message_type, handler)

    def unregister_handler(self, message_type: str) -> Handler | None:
        return self.dispatcher.unregister_handler(message_type)

    def on_connect(self, hook: ConnectHook) -> None:
        """Run ``await hook(connection)`` once each link is up (after the Welcome)."""
        self._connect_hooks.append(hook)

    def connection(self, hotkey: str) -> Connection | None:
        """The live connection to the peer ``hotkey``, if any."""
        return self._connections.get(hotkey)

    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot(len(self._connections))

    def _connection(self, ws: WebSocketConnection, peer_hotkey: str, offered: frozenset[str]) -> Connection:
        return Connection(
            ws,
            keypair=self.keypair,
            peer_hotkey=peer_hotkey,
            features=offered & frozenset(self.features),
            dispatcher=self.dispatcher,
            guard=self.guard,
            stats=self._stats,
            settings=self.settings,
        )

    async def _serve_connection(self, conn: Connection) -> None:
        """Run ``conn`` and the connect hooks until the link ends.

        A hook that fails ends this link only, as any of its tasks would (1011).
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            for hook in self._connect_hooks:
                try:
                    await hook(conn)
                except LinkClosed:
                    break
                except Exception:
                    log.exception("on_connect hook failed for %s", conn.hotkey)
                    conn.close(CLOSE_INTERNAL, "Internal error")
                    break
            await conn.closed.wait()
