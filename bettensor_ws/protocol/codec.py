"""Bytes to messages and back, rejecting anything two peers could read differently."""

from __future__ import annotations

import math
from typing import Any

import orjson

from .errors import DecodeError
from .messages import WebSocketMessage, build_message, message_class
from .replay import MAX_NONCE

__all__ = ["DEFAULT_MAX_SIZE", "MAX_DEPTH", "decode", "encode", "loads_checked"]

DEFAULT_MAX_SIZE = 1 << 20
MAX_DEPTH = 32
"""Deepest nesting accepted; real payloads are three levels deep."""

_ENVELOPE_KEYS = frozenset({"type", "sender", "data", "timestamp", "nonce", "signature"})
_REQUIRED = ("type", "sender", "data", "timestamp", "nonce")


def loads_checked(raw: str | bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> Any:
    """Parse JSON with the size, depth and finiteness limits of this protocol."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise DecodeError("invalid JSON: text is not valid UTF-8") from None
    elif not isinstance(raw, bytes | bytearray | memoryview):
        raise DecodeError(f"expected text or bytes, got {type(raw).__name__}")
    if len(raw) > max_size:
        raise DecodeError(f"message of {len(raw)} bytes over the limit of {max_size} bytes")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        text = str(exc)
        if "depth" in text or "recursion" in text.lower():
            raise DecodeError(f"nesting too deep (more than {MAX_DEPTH} levels)") from None
        if "infinity" in text.lower():
            raise DecodeError(f"non-finite number: {text}") from None
        literal = _non_finite_literal(raw, exc.pos)
        if literal is not None:
            raise DecodeError(f"non-finite number {literal} is not JSON: {text}") from None
        raise DecodeError(f"invalid JSON: {text}") from None
    if type(value) is dict or type(value) is list:
        _check_tree(value)
    return value


def _non_finite_literal(raw: bytes | bytearray | memoryview, pos: int) -> str | None:
    """The NaN/Infinity token (Python's ``json.dumps`` writes them) where orjson stopped."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if pos > 0 and text.startswith("-Infinity", pos - 1):  # orjson stops after the sign
        return "-Infinity"
    for literal in ("NaN", "Infinity"):
        if text.startswith(literal, pos):
            return literal
    return None


MAX_MAGNITUDE = 2.0**63
"""Largest number magnitude accepted. orjson reads a larger integer as a float, so a
stdlib peer would sign a different text than we verify; refusing it keeps both sides
reading the same value."""


def _check_tree(value: Any) -> None:
    """Reject deep nesting, NaN/Infinity and out-of-range numbers, without recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth >= MAX_DEPTH:
            raise DecodeError(f"nesting too deep (more than {MAX_DEPTH} levels)")
        for child in item.values() if type(item) is dict else item:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
            elif kind is float and not -MAX_MAGNITUDE < child < MAX_MAGNITUDE:
                if not math.isfinite(child):
                    raise DecodeError(f"non-finite number {child!r}")
                raise DecodeError(f"number {child!r} out of range (magnitude 2**63 or more)")


def decode(raw: str | bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> WebSocketMessage:
    """Turn one frame into a message of its registered class, payload checked.

    Raises DecodeError, and nothing else, with a reason a person can act on.
    """
    obj = loads_checked(raw, max_size=max_size)
    return decode_obj(obj)


def decode_obj(obj: Any) -> WebSocketMessage:
    """Like :func:`decode`, for JSON already parsed."""
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a JSON object, got {_json_kind(obj)}")
    for key in _REQUIRED:
        if key not in obj:
            raise DecodeError(f"missing field {key!r}")
    extra = obj.keys() - _ENVELOPE_KEYS
    if extra:
        raise DecodeError(f"unexpected top-level field {sorted(extra)[0]!r}")
    type_, sender, data = obj["type"], obj["sender"], obj["data"]
    timestamp, nonce, signature = obj["timestamp"], obj["nonce"], obj.get("signature")
    if not isinstance(type_, str):
        raise DecodeError(f"type: expected a string, got {_json_kind(type_)}")
    for name, value in (("sender", sender), ("timestamp", timestamp), ("nonce", nonce)):
        if not isinstance(value, str):
            raise DecodeError(f"{name}: expected a string, got {_json_kind(value)}")
    if not isinstance(data, dict):
        raise DecodeError(f"data: expected an object, got {_json_kind(data)}")
    for name, value in (("type", type_), ("nonce", nonce)):
        if len(value) > MAX_NONCE:
            raise DecodeError(f"{name}: longer than {MAX_NONCE} characters ({len(value)})")
    if signature is not None and not isinstance(signature, str):
        raise DecodeError(f"signature: expected a string or null, got {_json_kind(signature)}")
    cls = message_class(type_)
    try:
        view = cls.validate_data(data)
        message = build_message(cls, sender, data, timestamp, nonce, signature)
    except DecodeError:
        raise
    except Exception as exc:  # a user's message class failed on this payload
        raise DecodeError(f"{type_!r} message could not be built: {exc}") from None
    message._view = view
    return message


def encode(message: WebSocketMessage) -> str:
    """The wire text of ``message`` (compact JSON; signing uses its own canonical form)."""
    return orjson.dumps(message.to_dict()).decode("utf-8")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return "an array"
    return "an object"
