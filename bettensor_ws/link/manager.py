"""What validator and miner managers share: handlers, hooks, links, stats."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import attrs
import trio
from trio_websocket import WebSocketConnection

from ..protocol.dispatch import Connection, Dispatcher, Handler
from ..protocol.identity import canonical_hotkey
from ..protocol.link import ConnectionSettings, Frame, LinkProtocol, PeerLimits, Role
from ..protocol.messages import WebSocketMessage
from ..protocol.ratelimit import TokenBucket
from ..protocol.refusals import INTERNAL
from ..protocol.replay import ReplayGuard
from ..protocol.replies import to_message
from ..protocol.signing import Signer, sign
from ..protocol.stats import Stats
from .connection import LinkClosed, LinkConnection

__all__ = ["ConnectHook", "Manager", "settings_from"]

log = logging.getLogger("bettensor_ws.manager")

ConnectHook = Callable[[LinkConnection], Awaitable[None]]
M = TypeVar("M", bound=WebSocketMessage)

_SETTING_NAMES = frozenset(f.name for f in attrs.fields(ConnectionSettings))


def settings_from(
    default: ConnectionSettings, settings: ConnectionSettings | None, overrides: Mapping[str, Any]
) -> ConnectionSettings:
    """``settings`` (or the side's ``default``) with keyword overrides, checked.

    The keywords are the fields of :class:`ConnectionSettings`; anything else
    is a ``TypeError``, and a value out of range a ``ValueError``, at once.
    """
    unknown = sorted(set(overrides) - _SETTING_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return attrs.evolve(settings if settings is not None else default, **overrides)


class Manager:
    """The common half of both managers; each side adds how links are made.

    Owns the dispatch table, the connect hooks, the live links (one per peer
    hotkey), the replay guard and the statistics shared by those links.
    """

    ROLE: ClassVar[Role]

    def __init__(self, keypair: Signer, *, settings: ConnectionSettings, features: Iterable[str]) -> None:
        self.keypair = keypair
        self.hotkey: str = keypair.ss58_address
        self.settings = settings
        self.features = tuple(features)
        self.dispatcher = Dispatcher()
        self.guard = ReplayGuard(settings.replay_window)
        self._stats = Stats()
        self._connections: dict[str, LinkConnection] = {}
        self._connect_hooks: list[ConnectHook] = []

    def register_handler(
        self, message_type: str, handler: Callable[[Connection, M], Awaitable[object]]
    ) -> None:
        """Handle ``message_type`` with ``async def handler(websocket, message)``."""
        self.dispatcher.register_handler(message_type, handler)

    def unregister_handler(self, message_type: str) -> Handler | None:
        return self.dispatcher.unregister_handler(message_type)

    def on_connect(self, hook: ConnectHook) -> None:
        """Run ``await hook(connection)`` once each link is up (after the Welcome).

        Hooks run concurrently in the link's nursery and are cancelled when the
        link ends; one that fails ends that link (1011), logged.
        """
        self._connect_hooks.append(hook)

    def connection(self, hotkey: str) -> LinkConnection | None:
        """The live link to the peer ``hotkey`` (any spelling of its key), if any."""
        conn = self._connections.get(hotkey)
        if conn is None:
            canonical = canonical_hotkey(hotkey)
            conn = self._connections.get(canonical) if canonical is not None else None
        return conn

    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot(len(self._connections))

    def send_queue_depths(self) -> list[int]:
        """Frames waiting in each live link's send queue (for metrics, at scrape time)."""
        return [conn.queue_depth for conn in list(self._connections.values())]

    def _signed_frame(self, message: WebSocketMessage | dict[str, Any]) -> Frame:
        """``message`` signed with this side's key and encoded once, for any number of links."""
        return Frame.of(sign(to_message(message, self.hotkey), self.keypair))

    async def send_to(self, hotkey: str, message: WebSocketMessage | dict[str, Any]) -> bool:
        """Sign and queue ``message`` for the peer ``hotkey``; False when it is not connected."""
        conn = self.connection(hotkey)
        if conn is None:
            await trio.lowlevel.checkpoint()
            return False
        try:
            await conn.send_message(to_message(message, self.hotkey))
        except LinkClosed:
            return False
        return True

    async def save_guard(self) -> None:
        """Store the replay guard's new entries so they survive a restart.

        A manager has no store: nothing to do. The nodes keep them in SQLite.
        """
        await trio.lowlevel.checkpoint()

    def _connection(
        self,
        ws: WebSocketConnection,
        peer_hotkey: str,
        offered: frozenset[str],
        *,
        bound: bool = False,
        bucket: TokenBucket | None = None,
        peer_limits: PeerLimits | None = None,
        answer_heartbeats: bool = True,
    ) -> LinkConnection:
        protocol = LinkProtocol(
            role=self.ROLE,
            signer=self.keypair,
            peer_hotkey=peer_hotkey,
            settings=self.settings,
            guard=self.guard,
            stats=self._stats,
            now=trio.current_time(),
            features=offered & frozenset(self.features),
            handled=self.dispatcher.handlers,
            bound=bound,
            bucket=bucket,
            peer_limits=peer_limits,
            answer_heartbeats=answer_heartbeats,
        )
        return LinkConnection(ws, protocol, self.dispatcher)

    async def _serve_connection(self, conn: LinkConnection) -> None:
        """Run ``conn`` and its connect hooks, all in one nursery, until the link ends."""
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            for hook in self._connect_hooks:
                nursery.start_soon(self._run_hook, hook, conn)
            await conn.closed.wait()
            nursery.cancel_scope.cancel()

    @staticmethod
    async def _run_hook(hook: ConnectHook, conn: LinkConnection) -> None:
        try:
            await hook(conn)
        except LinkClosed:
            return
        except Exception:
            log.exception("on_connect hook failed for %s", conn.hotkey)
            conn.end(INTERNAL)
