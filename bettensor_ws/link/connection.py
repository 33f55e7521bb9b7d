"""One authenticated WebSocket link: thin pumps over its protocol object.

Validator and miner both run a :class:`LinkConnection` once the handshake is
done. Its nursery owns a reader (frames in, one verdict each from the
:class:`~bettensor_ws.protocol.link.LinkProtocol`), a writer (frames out) and
a watchdog (sleeps until the deadline the protocol names), and every handler
call, so nothing outlives the link. Every decision (admission, heartbeats,
timeouts, slow consumers) is the protocol object's; this module only moves
frames and time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ..protocol.dispatch import Dispatcher
from ..protocol.link import (
    BATCH,
    MINER_HOTKEY,
    Answer,
    Close,
    ConnectionSettings,
    Deliver,
    Frame,
    LinkProtocol,
    Notice,
    Refuse,
    Role,
)
from ..protocol.messages import ConfirmationMessage, WebSocketMessage, now_iso
from ..protocol.refusals import (
    FLOODED,
    GOING_AWAY,
    INTERNAL,
    CloseCode,
    LinkClose,
    RefusalKind,
    bounded,
)
from ..protocol.replies import to_message
from .outbound import OutboundQueue
from .transport import first_leaf, send_messages

__all__ = ["BATCH", "REASON_FLOODING", "ConnectionSettings", "LinkClosed", "LinkConnection"]

log = logging.getLogger("bettensor_ws.connection")

REASON_FLOODING = FLOODED.reason
"""The 1008 close reason for a peer that keeps flooding."""

_LOG_TRUNCATE = 300
_MAX_PENDING_RESULTS = 50_000
_WRITE_FRAMES = 64
_WRITE_BYTES = 256 * 1024
"""At most this many frames, and about this many bytes, go out in one socket write."""


class LinkClosed(Exception):
    """Sending on a connection that has closed."""


class LinkConnection:
    """The ``websocket`` a handler receives: ``send_json`` answers on this link.

    It satisfies :class:`bettensor_ws.Connection` (``hotkey``, ``send_json``,
    ``send_message``, ``close``) and holds no key a handler could use: signing
    is the protocol object's.
    """

    def __init__(self, ws: WebSocketConnection, protocol: LinkProtocol, dispatcher: Dispatcher) -> None:
        self._ws = ws
        self.protocol = protocol
        self.hotkey = protocol.peer_hotkey
        self.features = protocol.features
        self._dispatcher = dispatcher
        settings = protocol.settings
        self._queue = OutboundQueue(settings.send_queue_size, settings.send_queue_size)
        self._limiter = trio.CapacityLimiter(settings.handler_concurrency)
        self._scope: trio.CancelScope | None = None
        self._watch: trio.CancelScope | None = None
        self.closed = trio.Event()
        self._results: list[dict[str, Any]] = []
        # the frames the writer took from the queue and is writing: if the link is
        # cancelled during that write, the flush sends them first instead of losing them
        self._in_flight: list[Frame] = []
        # a frame the writer took from the queue while gathering a burst of
        # answers, to be written next on its own
        self._held: Frame | None = None

    # ---- what handlers and managers call -------------------------------------------------

    @property
    def sender(self) -> str:
        """Alias of ``hotkey``: the authenticated peer."""
        return self.hotkey

    @property
    def close_code(self) -> int:
        closing = self.protocol.closing
        return CloseCode.NORMAL if closing is None else closing.code

    @property
    def close_reason(self) -> str:
        closing = self.protocol.closing
        return "" if closing is None else closing.reason

    @property
    def frames_in(self) -> int:
        return self.protocol.frames_in

    @property
    def frames_out(self) -> int:
        return self.protocol.frames_out

    @property
    def queue_depth(self) -> int:
        """Frames waiting in the send queue (read by metrics at scrape time)."""
        return self._queue.pending()

    async def send_json(self, obj: Any) -> None:
        """Sign and queue a reply: a seed-style flat dict, an envelope, or a message."""
        await self.send_message(to_message(obj, ""))

    async def send_message(self, message: WebSocketMessage) -> None:
        """Sign ``message`` with this side's key and queue it ahead of broadcasts."""
        await self.send_frame(self.protocol.sign(message))

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

    def queue_results(self, results: Sequence[dict[str, Any]], *, together: bool = False) -> None:
        """Like :meth:`send_results`, without waiting: for tasks that serve many peers.

        ``together``: the results answer one batched frame; to a peer without
        ``batch`` (which sent one all the same) they go as one confirmation
        listing them all, the seed's batch answer, not one frame each.

        A peer that does not read its answers is closed rather than allowed to
        hold the caller up: with ``batch``, once more than 50,000 results wait;
        without, once its reply queue is full.
        """
        if self.protocol.closing is not None:
            return
        if together and BATCH not in self.features:
            results = [{"results": list(results)}]
        if BATCH in self.features:
            if len(self._results) + len(results) > _MAX_PENDING_RESULTS:
                self.end(self.protocol.overflowed())
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
                self.end(self.protocol.overflowed())
                return

    def _confirmation(self, data: dict[str, Any]) -> Frame:
        body = {**data, "timestamp": now_iso()}
        if self.protocol.role is Role.VALIDATOR:
            # named here, the miner it answers needs no copy of the message in sign()
            body[MINER_HOTKEY] = self.protocol.peer_hotkey
        # sign() sets the envelope's timestamp and nonce: none to make before it
        return self.protocol.sign(ConfirmationMessage(sender="", data=body, timestamp="", nonce=""))

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
            self.protocol.broadcast_dropped(trio.current_time())
            self._rearm()
        return accepted

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Ask the link to close with ``code``; the first request wins."""
        self.end(LinkClose(code, reason))

    def end(self, decision: LinkClose) -> None:
        """End the link for ``decision`` (a typed close); the first decision wins."""
        self.protocol.close(decision)
        if self._scope is not None:
            self._scope.cancel()

    # ---- the supervised tasks -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the link ends; the caller closes the WebSocket with ``close_code``.

        Cancelled from outside, the link says 1001 (going away); a task
        failing inside ends only this link, logged, with 1011.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self.protocol.closing is not None:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._writer)
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._reader, nursery)
                task_status.started()
        except* ConnectionClosed as group:
            self._peer_closed(group)
        except* trio.Cancelled:
            self.end(GOING_AWAY)
            raise
        except* Exception:
            log.exception("connection to %s failed", self.hotkey)
            self.end(INTERNAL)
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
        if not self.protocol.may_flush() or self._ws.closed:
            return
        with trio.move_on_after(self.protocol.settings.close_timeout / 2):
            try:
                if self._in_flight:
                    await send_messages(self._ws, [f.text for f in self._in_flight])
                    for written in self._in_flight:
                        self.protocol.send_finished(written)
                    self._in_flight = []
                if self._held is not None:
                    await self._ws.send_message(self._held.text)
                    self.protocol.send_finished(self._held)
                    self._held = None
                if self._results:
                    await self._ws.send_message(self._take_results().text)
                while (frame := self._queue.get_nowait()) is not None:
                    await self._ws.send_message(frame.text)
                    self.protocol.send_finished(frame)
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                return

    def _peer_closed(self, group: BaseExceptionGroup[ConnectionClosed]) -> None:
        first = first_leaf(group)
        reason = first.reason if isinstance(first, ConnectionClosed) else None
        code = reason.code if reason else CloseCode.NORMAL
        self.protocol.close(LinkClose(code, (reason.reason or "") if reason else ""))
        log.info("connection to %s closed by peer (%s)", self.hotkey, code)

    async def _reader(self, nursery: trio.Nursery) -> None:
        protocol = self.protocol
        concurrent = protocol.settings.handler_concurrency > 1
        while True:
            delay = protocol.read_delay(trio.current_time())
            if isinstance(delay, LinkClose):
                self.end(delay)
                await trio.lowlevel.checkpoint()
                continue
            if delay > 0:
                await trio.sleep(delay)  # backpressure: the peer is above its rate
            raw = await self._ws.get_message()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("<- %s %s", self.hotkey, bounded(raw, _LOG_TRUNCATE))
            verdict = protocol.receive(raw, now=trio.current_time(), wall=time.time())
            if isinstance(verdict, Deliver):
                if concurrent:
                    # messages are unhashable (attrs eq): borrow the slot under a token
                    token = object()
                    await self._limiter.acquire_on_behalf_of(token)
                    nursery.start_soon(self._dispatch_and_release, verdict.message, token)
                else:
                    await self._dispatch(verdict.message)
            elif isinstance(verdict, Answer):
                await self.send_frame(verdict.frame)
            elif isinstance(verdict, Refuse):
                level = logging.INFO if verdict.refusal.kind is RefusalKind.NO_HANDLER else logging.WARNING
                log.log(level, "refused a frame from %s: %s", self.hotkey, verdict.refusal.text())
                if verdict.frame is not None:
                    await self.send_frame(verdict.frame)
            elif isinstance(verdict, Close):
                self.end(verdict.close)
                await trio.lowlevel.checkpoint()
            elif isinstance(verdict, Notice):
                log.warning("validator %s says (unsigned, so proof of nothing): %s", self.hotkey, verdict.text)

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
        protocol = self.protocol
        while True:
            frame: Frame | None
            if self._held is not None:
                frame, self._held = self._held, None
            else:
                frame = self._take_results() if self._results else await self._queue.get()
            if frame is None:
                continue
            frames = [frame]
            if frame.type == ConfirmationMessage.MESSAGE_TYPE:
                # a burst of answers (one per prediction, to a peer without batch)
                # goes out in one write, in order; any other frame in a write of its own
                size = len(frame.text)
                while len(frames) < _WRITE_FRAMES and size < _WRITE_BYTES:
                    more = self._queue.get_nowait()
                    if more is None:
                        break
                    if more.type != ConfirmationMessage.MESSAGE_TYPE:
                        self._held = more  # the next write's
                        break
                    frames.append(more)
                    size += len(more.text)
            protocol.send_started(trio.current_time())
            self._rearm()
            self._in_flight = frames
            await send_messages(self._ws, [f.text for f in frames])
            self._in_flight = []
            for sent in frames:
                protocol.send_finished(sent)
            protocol.backlog(trio.current_time(), full=self._queue.broadcasts_full())
            if log.isEnabledFor(logging.DEBUG):
                for sent in frames:
                    log.debug("-> %s %s", self.hotkey, bounded(sent.text, _LOG_TRUNCATE))

    def _rearm(self) -> None:
        """Wake the watchdog sooner if the protocol's next deadline moved earlier."""
        if self._watch is not None:
            self._watch.deadline = min(self._watch.deadline, self.protocol.next_deadline())

    async def _watchdog(self) -> None:
        """Sleep until the protocol's next deadline; send or close as it says."""
        while True:
            with trio.CancelScope(deadline=self.protocol.next_deadline()) as self._watch:
                await trio.sleep_forever()
            action = self.protocol.poll(trio.current_time())
            if isinstance(action, LinkClose):
                self.end(action)
                return
            if action is not None:
                self._queue.put_reply_nowait(action)
