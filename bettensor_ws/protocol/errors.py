"""Exceptions raised by the protocol layer; each refusal carries its typed value."""

from __future__ import annotations

from .refusals import Refusal

__all__ = ["AuthError", "DecodeError", "HandshakeRefused", "MessageTypeConflict"]


class DecodeError(ValueError):
    """A frame could not be turned into a message; ``str(err)`` says why, for the peer."""


class AuthError(ValueError):
    """An auth frame was refused: ``refusal`` is the decision, ``reason`` its wire text."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.text())
        self.refusal = refusal
        self.reason = refusal.text()


class HandshakeRefused(Exception):
    """The validator refused us, or proved not to be who we expected.

    ``refusal`` is the decision as a value; ``retry_after`` the seconds the
    validator asked us to wait, if it said so; ``signed_by`` the key that
    signed a Welcome we refused as an impostor's (for the operator's log).
    """

    def __init__(self, message: str, refusal: Refusal, *, signed_by: str | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.signed_by = signed_by

    @property
    def retry_after(self) -> float | None:
        return self.refusal.retry_after


class MessageTypeConflict(TypeError):
    """Two different classes claimed the same ``MESSAGE_TYPE``."""
