"""Exceptions raised by the sans-IO core."""

from __future__ import annotations


class DecodeError(ValueError):
    """A frame could not be turned into a message; ``str(err)`` says why, for the peer."""


class AuthError(ValueError):
    """An auth frame was refused; ``reason`` is the text sent back to the peer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MessageTypeConflict(TypeError):
    """Two different classes claimed the same ``MESSAGE_TYPE``."""
