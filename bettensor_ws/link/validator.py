"""The validator side: accept miners, authenticate them, serve their connections."""

from __future__ import annotations

import hashlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, wrap_server_stream

from ..protocol.auth import AuthInfo, check_auth, cooldown_left, refusal_frame
from ..protocol.codec import loads_checked
from ..protocol.errors import AuthError, DecodeError
from ..protocol.identity import canonical_hotkey
from ..protocol.link import MINER_HOTKEY, ConnectionSettings, Role
from ..protocol.messages import (
    MAX_PREDICTION_BYTES,
    GameUpdateMessage,
    WebSocketMessage,
    WelcomeMessage,
    now_iso,
)
from ..protocol.payloads import TeamGame, converter, wire_game
from ..protocol.ratelimit import Budgets, FloodCooldown
from ..protocol.refusals import (
    DEREGISTERED,
    FLOODED,
    GOING_AWAY,
    INTERNAL,
    REPLACED,
    CloseCode,
    Refusal,
    RefusalKind,
    bounded,
)
from ..protocol.signing import Signer
from .connection import LinkConnection
from .http import HttpRoute, ReplayStream, plain_get, read_head, respond, url_host
from .manager import Manager, settings_from
from .transport import close_quietly, hold_transport, plain_errors

__all__ = ["VALIDATOR_SETTINGS", "ValidatorWebSocketManager", "url_host"]

log = logging.getLogger("bettensor_ws.validator")


FEATURES: tuple[str, ...] = ()

VALIDATOR_SETTINGS = ConnectionSettings(rate_limit=50.0, max_message_size=1 << 20)
"""A validator's defaults: miners are rate limited; a frame may be up to 1 MiB."""

HANDSHAKE_RATE = 0.5
HANDSHAKE_BURST = 20
"""Accepted handshakes a hotkey may make: 20 at once, then one every 2 s. Our miner's
backoff (1 s doubling to 60 s) stays far below it; a reconnect loop does not."""

AUTH_JITTER = 0.1
"""A connection's upgrade and auth deadlines are ``auth_timeout`` plus up to 10% more,
at random: peers that connected together (a slowloris crowd) are then not all refused,
and do not all reconnect, in the same instant, a burst that held up every other
miner's messages for tens of milliseconds."""


def _peer_of(stream: trio.abc.Stream) -> str:
    """``HOST:PORT`` of the peer on a TCP or TLS stream, for logs ("?" if none)."""
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    sock = getattr(transport, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        return "?"
    return f"{url_host(str(host))}:{port}" if port else "?"


def _hotkeys_of(metagraph: Any) -> frozenset[str] | None:
    """The registered keys, each in its canonical spelling (identity is the public key)."""
    if metagraph is None:
        return None
    hotkeys = getattr(metagraph, "hotkeys", metagraph)
    return frozenset(filter(None, (canonical_hotkey(str(h)) for h in hotkeys)))


def _wire_games(games: Iterable[TeamGame | dict[str, Any]]) -> list[dict[str, Any]]:
    return [wire_game(converter.unstructure(g) if isinstance(g, TeamGame) else dict(g)) for g in games]


class ValidatorWebSocketManager(Manager):
    """Serves miners on ``ws://host:port/ws``.

    ``metagraph`` is anything with ``.hotkeys`` (a Bittensor metagraph), a
    collection of ss58 addresses, or None to admit any hotkey that proves its
    key. Start it with ``await nursery.start(validator.serve)``.

    A miner closed for flooding is refused for ``flood_cooldown`` seconds (0:
    never): its next connections are answered from the auth frame alone, before
    the signature check, after a hold (see ``_wait_out_cooldown``). A flooder
    that reconnects at once then costs a cheap refusal every few seconds, not a
    full handshake and a fresh burst of refused frames every few milliseconds.
    """

    ROLE = Role.VALIDATOR

    def __init__(
        self,
        keypair: Signer,
        metagraph: Any = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        settings: ConnectionSettings | None = None,
        flood_cooldown: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        features: Iterable[str] = FEATURES,
        require_audience: bool = False,
        handshake_rate: float = HANDSHAKE_RATE,
        handshake_burst: int = HANDSHAKE_BURST,
        http_routes: Mapping[str, HttpRoute] | None = None,
        listeners: Sequence[trio.abc.Listener[Any]] | None = None,
        **overrides: Any,
    ) -> None:
        """``settings`` (default :data:`VALIDATOR_SETTINGS`) may be adjusted by
        keyword: ``ValidatorWebSocketManager(key, heartbeat_interval=30)``.

        ``require_audience`` refuses auth frames that do not name this
        validator (reference miners name none; ours always do).
        ``handshake_rate``/``handshake_burst`` budget each hotkey's accepted
        handshakes ("too many handshakes: retry in N s" past them), as
        ``rate_limit``/``rate_burst`` budget its frames, across reconnects.

        ``listeners``, already open (TLS already wrapped), are served instead of
        opening ``host:port``: a port shared by several processes, say, with
        SO_REUSEPORT. ``host`` then only names it in :attr:`url`."""
        super().__init__(
            keypair, settings=settings_from(VALIDATOR_SETTINGS, settings, overrides), features=features
        )
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._cooldown = FloodCooldown(flood_cooldown)
        # budgets belong to the hotkey, not the connection: reconnecting resets nothing
        rate = self.settings.rate_limit
        self._frame_budgets = Budgets(rate, self.settings.rate_burst) if rate else None
        self._handshake_budgets = Budgets(handshake_rate, handshake_burst)
        self._allowed = _hotkeys_of(metagraph)
        self.require_audience = require_audience
        self._last_games_digest: str | None = None
        self.http_routes: Mapping[str, HttpRoute] = dict(http_routes or {})
        self._listeners = list(listeners) if listeners is not None else None
        self.listening = trio.Event()

    @property
    def auth_timeout(self) -> float:
        return self.settings.auth_timeout

    @property
    def max_message_size(self) -> int:
        return self.settings.max_message_size

    # ---- configuration ---------------------------------------------------------------------

    def is_registered(self, hotkey: str) -> bool:
        """Whether ``hotkey`` (any spelling of a key) may connect now."""
        if self._allowed is None:
            return True
        return hotkey in self._allowed or canonical_hotkey(hotkey) in self._allowed

    def refresh_metagraph(self, metagraph: Any) -> list[str]:
        """Adopt a new metagraph; close (1008 "hotkey deregistered") the links of
        hotkeys that left. A handshake under way is checked again when its link
        is listed, so a refresh during it is not missed."""
        self._allowed = _hotkeys_of(metagraph)
        dropped = [h for h in self._connections if not self.is_registered(h)]
        for hotkey in dropped:
            self._connections[hotkey].end(DEREGISTERED)
        return dropped

    def peer_label(self, hotkey: str) -> str:
        """How a miner is named in the log; a node adds its UID."""
        return hotkey

    # ---- state -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Where miners connect: ``ws://HOST:PORT/ws`` (``wss://`` with TLS)."""
        return f"{'wss' if self.ssl_context else 'ws'}://{url_host(self.host)}:{self.port}/ws"

    @property
    def connected_hotkeys(self) -> list[str]:
        return list(self._connections)

    # ---- sending ---------------------------------------------------------------------------

    async def broadcast(self, message: WebSocketMessage | dict[str, Any]) -> int:
        """Send to every authenticated miner; signed and encoded once, never waits on one."""
        frame = self._signed_frame(message)
        sent = sum(conn.offer_broadcast(frame) for conn in list(self._connections.values()))
        await trio.lowlevel.checkpoint()
        return sent

    async def broadcast_game_updates(self, games: Iterable[TeamGame | dict[str, Any]]) -> int | None:
        """Broadcast games; None (skipped) when identical to the last update sent."""
        rows = _wire_games(games)
        digest = hashlib.sha256(orjson.dumps(rows, option=orjson.OPT_SORT_KEYS)).hexdigest()
        if digest == self._last_games_digest:
            await trio.lowlevel.checkpoint()
            return None
        self._last_games_digest = digest
        return await self.broadcast(self._game_update(rows))

    def game_update(self, games: Iterable[TeamGame | dict[str, Any]]) -> GameUpdateMessage:
        """``games`` as one update, each game as every peer reads it (see :func:`wire_game`)."""
        return self._game_update(_wire_games(games))

    def _game_update(self, rows: list[dict[str, Any]]) -> GameUpdateMessage:
        return GameUpdateMessage(sender=self.hotkey, data={"games": rows, "timestamp": now_iso()})

    # ---- serving ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status.started(port)`` once accepting.

        Cancelling closes every connection with 1001 within about a second.
        """
        with plain_errors():
            listeners: list[Any]
            if self._listeners is not None:
                listeners = self._listeners
            elif self.ssl_context is not None:
                listeners = await trio.open_ssl_over_tcp_listeners(self.port, self.ssl_context, host=self.host)
            else:
                listeners = await trio.open_tcp_listeners(self.port, host=self.host)
            first: Any = getattr(listeners[0], "transport_listener", listeners[0])  # under TLS, the TCP one
            self.port = first.socket.getsockname()[1]
            log.info("listening on %s", self.url)
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self.handle_stream, listeners)
                self.listening.set()
                task_status.started(self.port)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one transport stream (TCP, TLS, or in-memory in tests).

        A plain HTTP GET (no upgrade) is answered from ``http_routes`` and the
        stream closed; anything else goes to the WebSocket handshake. Whatever
        happens on this connection is logged and ends here: no error reaches
        the server's nursery.
        """
        peer = _peer_of(stream)
        try:
            deadline = trio.current_time() + self._auth_time()
            with trio.fail_at(deadline):
                if isinstance(stream, trio.SSLStream):
                    # A failed TLS handshake inside trio-websocket's reader would leave us
                    # waiting for an upgrade until auth_timeout; fail (and close) at once.
                    await stream.do_handshake()
                upgrade: trio.abc.Stream = stream
                if self.http_routes:
                    head = await read_head(stream)
                    path = plain_get(head)
                    if path is not None:
                        await respond(stream, path, self.http_routes)
                        return
                    upgrade = ReplayStream(stream, head)
            async with trio.open_nursery() as nursery:
                request, hold = await nursery.start(hold_transport, self._open_request(upgrade, deadline))
                try:
                    await self._serve_request(request, peer)
                finally:
                    hold.cancel()
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("connection from %s dropped during setup or close", peer)
        except* trio.TooSlowError:
            log.info("peer %s sent no WebSocket upgrade in time", peer)
        except* Exception:
            log.exception("connection handler failed (peer %s)", peer)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    def _auth_time(self) -> float:
        return self.auth_timeout * (1.0 + AUTH_JITTER * random.random())

    def _open_request(
        self, stream: trio.abc.Stream, deadline: float
    ) -> Callable[[trio.Nursery], Awaitable[WebSocketRequest]]:
        async def open_request(nursery: trio.Nursery) -> WebSocketRequest:
            with trio.fail_at(deadline):
                return await wrap_server_stream(
                    nursery, stream, message_queue_size=4, max_message_size=self.max_message_size
                )

        return open_request

    async def _serve_request(self, request: WebSocketRequest, peer: str = "?") -> None:
        if request.path.split("?", 1)[0] != "/ws":
            await request.reject(404, body=b"not found: the endpoint is /ws\n")
            return
        ws = await request.accept()
        conn: LinkConnection | None = None
        # how to close if there is no link yet: shut down while authenticating is
        # going away, anything else a failure inside
        fallback = INTERNAL
        try:
            try:
                accepted = await self._authenticate(ws, peer)
            except trio.Cancelled:
                fallback = GOING_AWAY
                raise
            if accepted is None:
                return
            conn, info = accepted
            await self._run_connection(conn, info, peer)
        finally:
            code, reason = (conn.close_code, conn.close_reason) if conn else (fallback.code, fallback.reason)
            if conn is not None or not ws.closed:
                await close_quietly(ws, code, reason, self.settings.close_timeout)

    async def _authenticate(self, ws: Any, peer: str = "?") -> tuple[LinkConnection, AuthInfo] | None:
        """Read and check the auth frame; on failure answer the reference's bare
        error (signed, which reference miners ignore)."""
        hold_until = trio.current_time() + self.auth_timeout / 2
        raw: str | bytes | None = None
        frame: Any = None
        with trio.move_on_after(self._auth_time()):
            raw = await ws.get_message()
        try:
            if raw is None:
                raise AuthError(Refusal(RefusalKind.AUTH_TIMEOUT))
            try:
                frame = loads_checked(raw, max_size=self.max_message_size)
            except DecodeError as exc:
                raise AuthError(Refusal(RefusalKind.AUTH_MALFORMED, str(exc))) from None
            await self._wait_out_cooldown(frame, hold_until)
            info = check_auth(
                frame,
                guard=self.guard,
                allowed=self.is_registered,
                now=time.time(),
                mono=trio.current_time(),
                audience=self.hotkey,
                require_audience=self.require_audience,
            )
            now = trio.current_time()
            handshakes = self._handshake_budgets.bucket(info.hotkey, now)
            if not handshakes.take(now):
                raise AuthError(Refusal.cooldown(handshakes.wait_for(now), RefusalKind.HANDSHAKE_RATE))
            # the nonce is on disk (with a store) before the Welcome leaves: a
            # restart cannot make this auth frame usable again
            await self.save_guard()
        except AuthError as exc:
            refusal = exc.refusal
            self._stats.reject(refusal.kind)
            claimed = frame.get("hotkey") if isinstance(frame, dict) else None
            who = bounded(claimed, 64) if isinstance(claimed, str) else "(no hotkey)"
            # one warning when a flood ban starts is enough; a flooder retries many times
            level = logging.DEBUG if refusal.kind is RefusalKind.FLOOD_COOLDOWN else logging.INFO
            log.log(level, "refused miner %s from %s: %s", who, peer, refusal.text(),
                    extra={"hotkey": who, "peer": peer, "refusal": refusal.key})
            await ws.send_message(refusal_frame(refusal, self.keypair, frame))
            await close_quietly(ws, CloseCode.POLICY, refusal.text(), self.settings.close_timeout)
            return None
        budgets = self._frame_budgets
        bucket = budgets.bucket(info.hotkey, trio.current_time()) if budgets is not None else None
        return self._connection(ws, info.hotkey, info.features, bucket=bucket), info

    async def _wait_out_cooldown(self, frame: Any, hold_until: float) -> None:
        """Refuse a hotkey still cooling down, before its signature is checked.

        The answer is held until the ban ends or ``hold_until`` (half the auth
        timeout after the upgrade), whichever is first: a flooder that retries as
        soon as it is answered then costs one cheap handshake per hold instead of
        one every few milliseconds, and a miner whose ban ends meanwhile goes on
        to the normal checks on this connection. The frame is unverified: a
        refusal grants nothing, and holding costs no more than a peer that sends
        no auth frame at all.
        """
        left = cooldown_left(frame, self._cooldown, trio.current_time())
        if left is None:
            return
        await trio.sleep_until(min(hold_until, trio.current_time() + left))
        left = cooldown_left(frame, self._cooldown, trio.current_time())
        if left is not None:
            raise AuthError(Refusal.cooldown(left))

    async def _run_connection(self, conn: LinkConnection, info: AuthInfo, peer: str = "?") -> None:
        # The Welcome is queued before the connection is listed, so no broadcast
        # can reach the miner ahead of it. It names the miner and echoes its auth
        # nonce, under our signature: relayed into another miner's handshake, it
        # is refused there.
        welcome: dict[str, Any] = {
            "message": "Connection established",
            "status": "success",
            MINER_HOTKEY: conn.hotkey,
            "auth_nonce": info.nonce,
            # the limits a miner must respect, so it never sends what would be refused
            "max_message_size": self.settings.max_message_size,
            "max_prediction_bytes": MAX_PREDICTION_BYTES,
        }
        if self.features:
            welcome["features"] = list(self.features)
        if self.is_registered(conn.hotkey):
            await conn.send_message(WelcomeMessage(sender=self.hotkey, data=welcome))
        # Registration is checked again as the link is listed, with no await in
        # between: a refresh_metagraph that ran during the handshake (it closes
        # only listed links) is not missed.
        if not self.is_registered(conn.hotkey):
            self._stats.reject(RefusalKind.DEREGISTERED)
            log.warning("miner %s (%s) deregistered during its handshake", conn.hotkey, peer)
            conn.end(DEREGISTERED)
            return
        old = self._connections.get(conn.hotkey)
        if old is not None:
            # two processes with one hotkey replace each other; the miner is told why
            log.info("miner %s connected again from %s: closing its older link as replaced",
                        conn.hotkey, peer, extra={"hotkey": conn.hotkey, "peer": peer})
            old.end(REPLACED)
        self._connections[conn.hotkey] = conn
        self._stats.connections_total += 1
        log.info("miner %s connected from %s", self.peer_label(conn.hotkey), peer,
                 extra={"hotkey": conn.hotkey, "peer": peer})
        try:
            await self._serve_connection(conn)
        finally:
            if self._connections.get(conn.hotkey) is conn:
                del self._connections[conn.hotkey]
            if conn.protocol.closing == FLOODED:
                self._cooldown.ban(conn.hotkey, trio.current_time())
                if conn.protocol.bucket is not None:
                    conn.protocol.bucket.strikes = 0  # the ban is the penalty; then a clean slate
                if self._cooldown.seconds > 0:
                    log.warning(
                        "miner %s closed for flooding: refused for %g s",
                        conn.hotkey, self._cooldown.seconds,
                    )
            log.info("miner %s (%s) disconnected: %d %s", self.peer_label(conn.hotkey), peer, conn.close_code,
                     conn.close_reason or "(no reason)",
                     extra={"hotkey": conn.hotkey, "peer": peer, "close_code": conn.close_code})
