"""The dispatch table: message type to ``async def handler(websocket, message)``.

Plain async code, no I/O library: the runtime awaits :meth:`Dispatcher.dispatch`
from whatever task owns the connection.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, runtime_checkable

from .messages import PredictionMessage, WebSocketMessage

__all__ = ["Connection", "Dispatcher", "Handler", "Replier", "echo_handler"]

log = logging.getLogger("bettensor_ws.dispatch")

INTERNAL_ERROR = "Internal server error"


class Replier(Protocol):
    """The least a handler's ``websocket`` argument offers: the seed's ``send_json``."""

    async def send_json(self, obj: Any) -> None: ...


@runtime_checkable
class Connection(Protocol):
    """What a handler receives as ``websocket``: the authenticated peer and a way to answer.

    The live link and :class:`bettensor_ws.testing.MockWebSocket` both are
    one. It hands out no signing key: replies are signed by the link.
    """

    @property
    def hotkey(self) -> str:
        """The peer's ss58 hotkey, proved in the handshake."""
        ...

    async def send_json(self, obj: Any) -> None:
        """Sign and queue a reply: a seed-style flat dict, an envelope, or a message."""
        ...

    async def send_message(self, message: WebSocketMessage) -> None:
        """Sign and queue ``message``."""
        ...

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Ask the link to close; the first request wins."""
        ...


M = TypeVar("M", bound=WebSocketMessage)

Handler = Callable[[Connection, Any], Awaitable[object]]
"""``async def handler(websocket, message)``; the message is of the registered type."""


class Dispatcher:
    """Routes a message to the handler registered for its type."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register_handler(
        self, message_type: str, handler: Callable[[Connection, M], Awaitable[object]]
    ) -> None:
        """Handle ``message_type`` with ``handler``, replacing any earlier one.

        The handler may annotate its message as the class registered for that
        type (``PredictionMessage`` for ``"prediction"``): only such messages
        reach it.
        """
        if not callable(handler):
            raise TypeError("handler must be an async callable (websocket, message)")
        self._handlers[message_type] = handler

    def unregister_handler(self, message_type: str) -> Handler | None:
        """Remove and return the handler for ``message_type``, if any."""
        return self._handlers.pop(message_type, None)

    @property
    def handlers(self) -> Mapping[str, Handler]:
        """A read-only view of what is registered."""
        return MappingProxyType(self._handlers)

    async def dispatch(self, websocket: Any, message: WebSocketMessage) -> bool:
        """Run the handler for ``message``; True when one ran and returned normally.

        No handler: the sender is told which type went unhandled. A handler
        that raises is logged with its traceback and the sender gets the seed's
        "Internal server error"; the caller goes on serving either way.
        """
        handler = self._handlers.get(message.type)
        if handler is None:
            await websocket.send_json(
                {"type": "error", "message": f"No handler registered for message type {message.type!r}"}
            )
            return False
        try:
            await handler(websocket, message)
        except Exception:
            log.exception("handler for %r from %s raised", message.type, message.sender)
            await websocket.send_json(_internal_error_reply(message))
            return False
        return True


def _internal_error_reply(message: WebSocketMessage) -> dict[str, Any]:
    if isinstance(message, PredictionMessage):
        reply: dict[str, Any] = {"type": "confirmation", "status": "error", "message": INTERNAL_ERROR}
        if not message.is_batch:
            reply["prediction_id"] = message.data.get("prediction_id", message.data.get("id"))
        return reply
    return {"type": "error", "message": INTERNAL_ERROR}


async def echo_handler(websocket: Replier, message: WebSocketMessage) -> None:
    """Send the message's type and data straight back (the seed's connection test)."""
    await websocket.send_json({"type": message.type, "data": message.data})
