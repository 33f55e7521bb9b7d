"""What the shell needs of trio-websocket beyond sending and receiving:
holding its I/O task through cancellation, closing politely, keeping
exception groups from reaching the caller, and writing several messages at once."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import TextMessage

from ..protocol.refusals import MAX_CLOSE_REASON

__all__ = ["close_quietly", "first_leaf", "hold_transport", "plain_errors", "send_messages"]

log = logging.getLogger("bettensor_ws.connection")


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception that is not a group: nurseries nest groups in groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _sole_leaf(exc: BaseException) -> BaseException | None:
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


@contextmanager
def plain_errors() -> Iterator[None]:
    """Let a lone error out of nested nurseries reach the caller as itself.

    A port in use should be an ``OSError`` to whoever called ``serve()``,
    not an exception group; a group of several errors stays a group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = _sole_leaf(group)
        if isinstance(leaf, Exception):
            raise leaf from None
        raise


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
            await ws.aclose(code, reason[:MAX_CLOSE_REASON] or None)
        except Exception:  # the stream may already be broken; closing is best effort
            log.debug("close of %s failed", ws, exc_info=True)


_INTERNALS = ("_close_reason", "_wsproto", "_stream_lock", "_stream", "_abort_web_socket")


async def send_messages(ws: WebSocketConnection, texts: Sequence[str]) -> None:
    """Send text messages in order, framed together and written with one ``send_all``.

    trio-websocket writes each message with a socket send and a scheduling
    round of its own; a writer with many frames queued (a burst of answers to
    one miner) saves both for all but the first. It uses trio-websocket's framing
    (its wsproto connection, under its send lock) exactly as ``send_message``
    does, and falls back to one ``send_message`` each if those internals ever
    change shape.
    """
    if len(texts) == 1 or not all(hasattr(ws, name) for name in _INTERNALS):
        for text in texts:
            await ws.send_message(text)
        return
    impl: Any = ws
    if impl._close_reason:
        raise ConnectionClosed(impl._close_reason)
    data = b"".join(impl._wsproto.send(TextMessage(data=text)) for text in texts)
    async with impl._stream_lock:
        try:
            await impl._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await impl._abort_web_socket()
            raise ConnectionClosed(impl._close_reason) from None
