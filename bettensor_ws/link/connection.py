"""One authenticated WebSocket link: its reader, writer and heartbeat tasks.

Validator and miner both run a :class:`Connection` once the handshake is done;
they differ only in who sends error replies. A connection's nursery owns every
task it starts, handler calls included, so nothing outlives it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ..protocol.codec import decode_obj, encode, loads_checked
from ..protocol.dispatch import Dispatcher
from ..protocol.errors import DecodeError
from ..protocol.messages import (
    ConfirmationMessage,
    ErrorMessage,
    HeartbeatAckMessage,
    HeartbeatMessage,
    WebSocketMessage,
    now_iso,
)
from ..protocol.ratelimit import TokenBucket
from ..protocol.replay import ReplayGuard
from ..protocol.replies import to_message
from ..protocol.signing import Signer, sign, verify
from ..protocol.stats import Stats
from .outbound import Frame, OutboundQueue

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_TOO_BIG",
    "Connection",
    "ConnectionSettings",
    "REASON_FLOODING",
    "LinkClosed",
    "hold_transport",
]

log = logging.getLogger("bettensor_ws.connection")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011

REASON_FLOODING = "rate limit exceeded"
"""The 1008 close reason for a peer that keeps flooding; the validator bans on it."""

# Types answered or consumed by the runtime itself when no handler claims them;
# replying "no handler" to these could ping-pong errors between two peers.
_SILENT_TYPES = frozenset({"error", "heartbeat_ack", "welcome"})
_LOG_TRUNCATE = 300
BATCH = "batch"
_MAX_PENDING_RESULTS = 50_000


class LinkClosed(Exception):
    """Sending on a connection that has closed."""


@attrs.define
class ConnectionSettings:
    """Per-connection limits and timings shared by every connection of a manager."""

    heartbeat_interval: float = 60.0
    connection_timeout: float = 300.0
    send_timeout: float = 10.0
    max_message_size: int = 1 << 20
    rate_limit: float | None = None
    rate_burst: int = 200
    flood_strikes: int = attrs.field(
        default=attrs.Factory(lambda self: max(self.rate_burst, 20), takes_self=True)
    )
    """Consecutive rate-limit refusals before a peer is closed."""
    handler_concurrency: int = 1
    send_queue_size: int = 256
    close_timeout: float = 1.0
    reply_errors: bool = True


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception that is not a group: nurseries nest groups in groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _truncate(text: str | bytes) -> str:
    shown = text if isinstance(text, str) else repr(text)
    return shown if len(shown) <= _LOG_TRUNCATE else shown[:_LOG_TRUNCATE] + "..."


class Connection:
    """The ``websocket`` a handler receives: ``send_json`` answers on this link.

    Frames the peer sends are checked in order (rate, size and syntax,
    sender, signature, replay) and only then dispatched; every refusal is
    answered (validator side) and counted, never silently dropped.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        keypair: Signer,
        peer_hotkey: str,
        features: frozenset[str],
        dispatcher: Dispatcher,
        guard: ReplayGuard,
        stats: Stats,
        settings: ConnectionSettings,
    ) -> None:
        self.ws = ws
        self.keypair = keypair
        self.hotkey = peer_hotkey
        self.features = features
        self._dispatcher = dispatcher
        self._guard = guard
        self._stats = stats
        self._settings = settings
        self._queue = OutboundQueue(settings.send_queue_size, settings.send_queue_size)
        self._bucket = (
            TokenBucket(settings.rate_limit, settings.rate_burst, now=trio.current_time())
            if settings.rate_limit
            else None
        )
        self._limiter = trio.CapacityLimiter(max(1, settings.handler_concurrency))
        self._scope: trio.CancelScope | None = None
        self._last_recv = trio.current_time()
        self.close_code = CLOSE_NORMAL
        self.close_reason = ""
        self._close_requested = False
        self.closed = trio.Event()
        self.frames_in = 0
        self.frames_out = 0
        self._results: list[dict[str, Any]] = []

    # ---- what handlers and managers call -------------------------------------------------

    @property
    def sender(self) -> str:
        """Alias of ``hotkey``: the authenticated peer."""
        return self.hotkey

    async def send_json(self, obj: Any) -> None:
        """Sign and queue a reply: a seed-style flat dict, an envelope, or a message."""
        await self.send_message(to_message(obj, self.keypair.ss58_address))

    async def send_message(self, message: WebSocketMessage) -> None:
        """Sign ``message`` with this side's key and queue it ahead of broadcasts."""
        signed = sign(message, self.keypair)
        await self.send_frame(Frame(signed.type, encode(signed)))

    async def send_frame(self, frame: Frame) -> None:
        """Queue an already signed frame as a reply (waits while the queue is full)."""
        try:
            await self._queue.put_reply(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LinkClosed(f"connection to {self.hotkey} is closed") from None

    async def send_results(self, results: Sequence[dict[str, Any]]) -> None:
        """Answer predictions with ``{"prediction_id", "status", "message"}`` results.

        To a peer that announced ``batch``, every result gathered before the
        writer gets to them goes out as one batched confirmation, signed once;
        to any other peer, one confirmation per result, as the reference expects.
        """
        if BATCH in self.features:
            self.queue_results(results)
            await trio.lowlevel.checkpoint()
            return
        for result in results:
            await self.send_frame(self._confirmation(result))

    def queue_results(self, results: Sequence[dict[str, Any]]) -> None:
        """Like :meth:`send_results`, without waiting: for tasks that serve many peers.

        A peer that does not read its answers is closed rather than allowed to
        hold the caller up: with ``batch``, once more than 50,000 results wait;
        without, once its reply queue is full.
        """
        if self._close_requested:
            return
        if BATCH in self.features:
            if len(self._results) + len(results) > _MAX_PENDING_RESULTS:
                self.close(CLOSE_POLICY, "slow consumer")
                return
            self._results.extend(results)
            self._queue.wake()
            return
        for result in results:
            try:
                queued = self._queue.put_reply_nowait(self._confirmation(result))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            if not queued:
                self.close(CLOSE_POLICY, "slow consumer")
                return

    def _confirmation(self, data: dict[str, Any]) -> Frame:
        message = sign(
            ConfirmationMessage(sender="", data={**data, "timestamp": now_iso()}), self.keypair
        )
        return Frame(message.type, encode(message))

    def _take_results(self) -> Frame:
        results, self._results = self._results, []
        return self._confirmation({"results": results})

    def offer_broadcast(self, frame: Frame) -> bool:
        """Queue an already signed frame without waiting; False if this peer is behind."""
        try:
            accepted = self._queue.put_broadcast_nowait(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        if not accepted:
            self._stats.dropped_broadcasts += 1
        return accepted

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Ask the connection to close with ``code``; the first request wins."""
        if not self._close_requested:
            self._close_requested = True
            self.close_code, self.close_reason = code, reason
        if self._scope is not None:
            self._scope.cancel()

    # ---- the supervised tasks -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the link ends; the caller closes the WebSocket with ``close_code``.

        Cancelled from outside, the connection says 1001 (going away); a task
        failing inside ends only this connection, logged, with 1011.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self._close_requested:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._writer)
                nursery.start_soon(self._heartbeat)
                nursery.start_soon(self._reader, nursery)
                task_status.started()
        except* ConnectionClosed as group:
            self._peer_closed(group)
        except* trio.Cancelled:
            self.close(CLOSE_GOING_AWAY, "Going away")
            raise
        except* Exception:
            log.exception("connection to %s failed", self.hotkey)
            self.close(CLOSE_INTERNAL, "Internal error")
        finally:
            with trio.CancelScope(shield=True):
                await self._flush()
            self._queue.close()
            self.closed.set()

    async def _flush(self) -> None:
        """Send what is still queued before the close frame, within half the close time.

        A confirmation queued just before shutdown or replacement reaches the
        miner; a peer that stopped reading, or that already left, gets nothing more.
        """
        if self.close_reason == "slow consumer" or self.ws.closed:
            return
        with trio.move_on_after(self._settings.close_timeout / 2):
            try:
                if self._results:
                    await self.ws.send_message(self._take_results().text)
                while (frame := self._queue.get_nowait()) is not None:
                    await self.ws.send_message(frame.text)
                    self._stats.frames_out[frame.type] += 1
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                return

    def _peer_closed(self, group: BaseExceptionGroup[ConnectionClosed]) -> None:
        first = first_leaf(group)
        reason = first.reason if isinstance(first, ConnectionClosed) else None
        self.close(reason.code if reason else CLOSE_NORMAL, (reason.reason or "") if reason else "")
        log.info("connection to %s closed by peer (%s)", self.hotkey, self.close_code)

    async def _reader(self, nursery: trio.Nursery) -> None:
        settings = self._settings
        while True:
            raw = await self.ws.get_message()
            self._last_recv = trio.current_time()
            self.frames_in += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("<- %s %s", self.hotkey, _truncate(raw))
            message = await self._admit(raw)
            if message is None:
                continue
            self._stats.frames_in[message.type] += 1
            if message.type == HeartbeatMessage.MESSAGE_TYPE and "heartbeat" not in self._dispatcher.handlers:
                await self.send_message(HeartbeatAckMessage(sender="", data={}))
                continue
            if message.type in _SILENT_TYPES and message.type not in self._dispatcher.handlers:
                continue
            if settings.handler_concurrency <= 1:
                await self._dispatch(message)
            else:
                # messages are unhashable (attrs eq): borrow the slot under a token
                token = object()
                await self._limiter.acquire_on_behalf_of(token)
                nursery.start_soon(self._dispatch_and_release, message, token)

    async def _admit(self, raw: str | bytes) -> WebSocketMessage | None:
        """The frame as a verified message, or None after answering why not."""
        if self._bucket is not None and not self._bucket.take(trio.current_time()):
            if self._bucket.strikes > self._settings.flood_strikes:
                self._stats.reject("flooding")
                self.close(CLOSE_POLICY, REASON_FLOODING)
                await trio.lowlevel.checkpoint()
                return None
            await self._refuse("rate limited")
            return None
        if isinstance(raw, bytes):
            await self._refuse("binary frames are not supported; send JSON text")
            return None
        obj: Any = None
        try:
            obj = loads_checked(raw, max_size=self._settings.max_message_size)
            message = decode_obj(obj)
        except DecodeError as exc:
            nonce = obj.get("nonce") if isinstance(obj, dict) else None
            await self._refuse(str(exc), nonce if isinstance(nonce, str) else None)
            return None
        if message.sender != self.hotkey:
            await self._refuse("sender does not match the authenticated hotkey", message.nonce)
            return None
        if not verify(message):
            await self._refuse("bad signature", message.nonce)
            return None
        problem = self._guard.check(message.sender, message.nonce, message.timestamp)
        if problem is not None:
            await self._refuse(problem, message.nonce)
            return None
        return message

    async def _refuse(self, reason: str, nonce: str | None = None) -> None:
        """Answer a refused frame; ``refused_nonce`` lets the sender tell which one."""
        self._stats.reject(reason)
        log.warning("refused a frame from %s: %s", self.hotkey, reason)
        if self._settings.reply_errors:
            data: dict[str, Any] = {"message": reason}
            if nonce is not None:
                data["refused_nonce"] = nonce
            await self.send_message(ErrorMessage(sender="", data=data))

    async def _dispatch(self, message: WebSocketMessage) -> None:
        try:
            await self._dispatcher.dispatch(self, message)
        except LinkClosed:
            return

    async def _dispatch_and_release(self, message: WebSocketMessage, token: object) -> None:
        try:
            await self._dispatch(message)
        finally:
            self._limiter.release_on_behalf_of(token)

    async def _writer(self) -> None:
        send_timeout = self._settings.send_timeout
        while True:
            frame = self._take_results() if self._results else await self._queue.get()
            if frame is None:
                continue
            with trio.move_on_after(send_timeout) as scope:
                await self.ws.send_message(frame.text)
            if scope.cancelled_caught:
                self._stats.reject("slow consumer")
                self.close(CLOSE_POLICY, "slow consumer")
                return
            self.frames_out += 1
            self._stats.frames_out[frame.type] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("-> %s %s", self.hotkey, _truncate(frame.text))

    async def _heartbeat(self) -> None:
        settings = self._settings
        next_beat = trio.current_time() + settings.heartbeat_interval
        while True:
            deadline = self._last_recv + settings.connection_timeout
            full_since = self._queue.full_since
            wake = min(next_beat, deadline)
            if full_since is not None:
                wake = min(wake, full_since + settings.send_timeout)
            await trio.sleep_until(wake)
            now = trio.current_time()
            if now >= self._last_recv + settings.connection_timeout:
                self._stats.reject("connection timeout")
                self.close(CLOSE_INTERNAL, "connection timeout")
                return
            full_since = self._queue.full_since
            if full_since is not None and now >= full_since + settings.send_timeout:
                self._stats.reject("slow consumer")
                self.close(CLOSE_POLICY, "slow consumer")
                return
            if now >= next_beat:
                beat = sign(HeartbeatMessage(sender="", data={}), self.keypair)
                self._queue.put_reply_nowait(Frame(beat.type, encode(beat)))
                next_beat = now + settings.heartbeat_interval


async def hold_transport(
    open_ws: Callable[[trio.Nursery], Awaitable[Any]],
    *,
    task_status: trio.TaskStatus[tuple[Any, trio.CancelScope]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep a WebSocket's own I/O task alive through cancellation until told to stop.

    trio-websocket runs a reader task per connection and sends no close frame
    when cancelled. Opening happens unshielded (so shutdown is prompt), then
    the scope is shielded: the caller can still say goodbye with a close frame
    and hear the answer, and cancels the returned scope when done.
    """
    async with trio.open_nursery() as nursery:
        ws = await open_ws(nursery)
        nursery.cancel_scope.shield = True
        task_status.started((ws, nursery.cancel_scope))
        await trio.sleep_forever()


async def close_quietly(ws: WebSocketConnection, code: int, reason: str, deadline: float) -> None:
    """Send a close frame and wait briefly for the answer, even while being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(deadline):
        try:
            await ws.aclose(code, reason[:120] or None)
        except Exception:  # the stream may already be broken; closing is best effort
            log.debug("close of %s failed", ws, exc_info=True)
