"""Test doubles for handler authors (the seed's ``MockWebSocket``)."""

from __future__ import annotations

from typing import Any

from .protocol.codec import decode, encode
from .protocol.messages import WebSocketMessage
from .protocol.replies import to_message

__all__ = ["MockWebSocket"]


class MockWebSocket:
    """Records what a handler sends, as decoded messages in ``.sent``.

    A :class:`bettensor_ws.Connection`, like the live link a handler receives.

    Each reply goes through the real codec, so a handler whose reply would not
    survive the wire fails here too.
    """

    def __init__(self, hotkey: str = "mock_hotkey") -> None:
        self.hotkey = hotkey
        self.sent: list[WebSocketMessage] = []
        self.closed: tuple[int, str] | None = None

    async def send_json(self, obj: Any) -> None:
        self.sent.append(decode(encode(to_message(obj, self.hotkey))))

    async def send_message(self, message: WebSocketMessage) -> None:
        self.sent.append(decode(encode(message)))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Record the close a handler asked for (synchronous, as on a live link)."""
        self.closed = (code, reason)

    @property
    def sent_json(self) -> list[dict[str, Any]]:
        """What was sent, as envelopes."""
        return [m.to_dict() for m in self.sent]
