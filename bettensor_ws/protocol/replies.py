"""Turning what a handler passes to ``send_json`` into a message.

Handlers written to the seed pass flat dicts such as
``{"type": "confirmation", "status": "error", "message": reason}``; others pass
whole envelopes. Both become one message of the named type; the connection
then signs it, so sender, timestamp and nonce here are placeholders.
"""

from __future__ import annotations

from typing import Any

from .messages import WebSocketMessage, build_message, message_class, new_nonce, now_iso

__all__ = ["to_message"]

_ENVELOPE_EXTRAS = frozenset({"sender", "timestamp", "nonce", "signature"})


def to_message(obj: WebSocketMessage | dict[str, Any], sender: str) -> WebSocketMessage:
    """A message for ``obj``: a message as is, an envelope, or a seed-style flat dict."""
    if isinstance(obj, WebSocketMessage):
        return obj
    if not isinstance(obj, dict):
        raise TypeError(f"send_json takes a dict, got {type(obj).__name__}")
    message_type = obj.get("type")
    if not isinstance(message_type, str):
        raise ValueError("send_json needs a dict with a string 'type' key")
    cls = message_class(message_type)
    rest = {k: v for k, v in obj.items() if k != "type"}
    if isinstance(rest.get("data"), dict) and rest.keys() <= _ENVELOPE_EXTRAS | {"data"}:
        data = rest["data"]
    else:
        data = rest
    return build_message(cls, sender, data, now_iso(), new_nonce(), None)
