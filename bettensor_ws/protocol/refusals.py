"""Refusals and close codes as values.

A decision is made once, where it is taken, as a :class:`Refusal` (its kind,
a bounded detail, whether it can heal, an optional retry-after); the wire
text of ``docs/protocol.md`` is produced from it by :meth:`Refusal.text` and
read back by :meth:`Refusal.parse`, both here, so rewording a message cannot
silently turn a retry into a permanent rejection. Statistics count by kind,
a fixed set, never by text a peer chose.
"""

from __future__ import annotations

import enum
import math
import re

import attrs

__all__ = [
    "MAX_DETAIL",
    "CloseCode",
    "LinkClose",
    "Refusal",
    "RefusalKind",
    "bounded",
]

MAX_DETAIL = 200
"""Characters of detail a refusal keeps: peer-chosen text is cut here before it
is stored, logged, counted or echoed."""

MAX_CLOSE_REASON = 120
"""A WebSocket close reason must fit in 123 bytes of UTF-8; ASCII reasons are cut here."""


def bounded(text: object, limit: int = MAX_DETAIL) -> str:
    """``text`` as a string of at most ``limit`` characters (marked when cut)."""
    shown = text if isinstance(text, str) else repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


class CloseCode(enum.IntEnum):
    """The WebSocket close codes this protocol uses (RFC 6455, section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011


class RefusalKind(enum.Enum):
    """Why something was refused. The value is the statistics key.

    ``template`` is the wire text (``{detail}`` is where the detail goes);
    ``transient`` says whether the same thing may be accepted later unchanged
    (a miner keeps such a prediction pending and sends it again).
    """

    # a frame on an authenticated link
    RATE_LIMITED = ("rate limited", "rate limited", True)
    BINARY = ("binary frame", "binary frames are not supported; send JSON text", False)
    MALFORMED = ("malformed", "{detail}", False)
    WRONG_SENDER = ("wrong sender", "sender does not match the authenticated hotkey", False)
    BAD_SIGNATURE = ("bad signature", "bad signature", False)
    MALFORMED_TIMESTAMP = ("malformed timestamp", "malformed timestamp", False)
    STALE_TIMESTAMP = ("stale timestamp", "stale timestamp ({detail})", True)
    FUTURE_TIMESTAMP = ("future timestamp", "future timestamp ({detail})", True)
    REPLAYED_NONCE = ("replayed nonce", "replayed nonce", True)
    REPLAY_GUARD_FULL = ("replay guard full", "replay guard full", True)
    REPLAY_QUOTA = ("replay quota", "replay quota exceeded ({detail} frames in the window)", True)
    MISADDRESSED = ("misaddressed", "addressed to another miner: {detail}", False)
    NO_HANDLER = ("no handler", "No handler registered for message type {detail}", False)
    INTERNAL_ERROR = ("internal error", "Internal server error", True)
    # the handshake
    AUTH_MALFORMED = ("malformed auth frame", "malformed auth frame: {detail}", False)
    AUTH_TIMEOUT = ("auth timeout", "auth timeout", True)
    NOT_REGISTERED = ("hotkey not registered", "hotkey not registered", False)
    WRONG_AUDIENCE = ("wrong audience", "auth frame addressed to another validator", False)
    NO_AUDIENCE = ("no audience", "auth frame names no audience; this validator requires one", False)
    FLOOD_COOLDOWN = ("flood cooldown", "flood cooldown: retry in {detail} s", True)
    HANDSHAKE_RATE = ("handshake rate", "too many handshakes: retry in {detail} s", True)
    IMPOSTOR = ("impostor", "welcome not signed by the expected validator hotkey", False)
    BAD_WELCOME = ("bad welcome", "bad welcome: {detail}", False)
    WRONG_SESSION = ("wrong session", "welcome not made for this handshake: {detail}", False)
    CONNECT_FAILED = ("connect failed", "connect failed: {detail}", True)
    # the end of a link
    FLOODING = ("flooding", "rate limit exceeded", True)
    SLOW_CONSUMER = ("slow consumer", "slow consumer", True)
    CONNECTION_TIMEOUT = ("connection timeout", "connection timeout", True)
    DEREGISTERED = ("deregistered", "hotkey deregistered", False)

    def __init__(self, key: str, template: str, transient: bool) -> None:
        self.key = key
        self.template = template
        self.transient = transient
        self.prefix, _, self.suffix = template.partition("{detail}")
        self.has_detail = "{detail}" in template


# longest prefix first, so "malformed auth frame: x" is not read as "malformed timestamp"
_BY_PREFIX = sorted(
    (k for k in RefusalKind if k.prefix), key=lambda k: len(k.prefix), reverse=True
)
_RETRY_HINT = re.compile(r"retry in (\d+(?:\.\d+)?) s")


@attrs.frozen
class Refusal:
    """One refusal: what kind, a bounded detail, and when to try again if said."""

    kind: RefusalKind
    detail: str = attrs.field(default="", converter=bounded)
    retry_after: float | None = None

    @property
    def transient(self) -> bool:
        """True when the same frame or prediction may be accepted later unchanged."""
        return self.kind.transient

    @property
    def key(self) -> str:
        """The statistics key: one of a fixed set."""
        return self.kind.key

    def text(self) -> str:
        """The wire text, as ``docs/protocol.md`` gives it (bounded)."""
        if not self.kind.has_detail:
            return self.kind.template
        return self.kind.template.replace("{detail}", self.detail)

    def __str__(self) -> str:
        return self.text()

    @classmethod
    def parse(cls, text: object) -> Refusal:
        """Read a peer's refusal text back into a value, at the edge, once.

        Unknown text is taken as :attr:`RefusalKind.MALFORMED` (a verdict on
        the frame's content, not transient), as a decode error would be.
        """
        shown = bounded(text if isinstance(text, str) else "")
        for kind in _BY_PREFIX:
            if shown.startswith(kind.prefix):
                detail = shown[len(kind.prefix):]
                if kind.suffix and detail.endswith(kind.suffix):
                    detail = detail[: -len(kind.suffix)]
                retry_after = None
                if kind in (RefusalKind.FLOOD_COOLDOWN, RefusalKind.HANDSHAKE_RATE):
                    hint = _RETRY_HINT.search(shown)
                    retry_after = float(hint.group(1)) if hint else None
                return cls(kind, detail if kind.has_detail else "", retry_after)
        return cls(RefusalKind.MALFORMED, shown)

    @classmethod
    def cooldown(cls, seconds_left: float, kind: RefusalKind = RefusalKind.FLOOD_COOLDOWN) -> Refusal:
        """A hotkey still cooling down after a flood (or over its handshake
        budget), told when to come back."""
        seconds = max(1, math.ceil(seconds_left))
        return cls(kind, str(seconds), float(seconds))


def _close_reason(reason: object) -> str:
    return bounded(reason, MAX_CLOSE_REASON)


@attrs.frozen
class LinkClose:
    """The decision to end a link: the close code, the reason sent, and why."""

    code: int
    """A :class:`CloseCode`, or another code an application or peer chose."""
    reason: str = attrs.field(default="", converter=_close_reason)
    kind: RefusalKind | None = None

    @classmethod
    def refused(cls, code: int, refusal: Refusal) -> LinkClose:
        return cls(code, refusal.text(), refusal.kind)


# The close decisions every link can take, made once.
GOING_AWAY = LinkClose(CloseCode.GOING_AWAY, "Going away")
INTERNAL = LinkClose(CloseCode.INTERNAL, "Internal error")
REPLACED = LinkClose(CloseCode.NORMAL, "New connection established")
FLOODED = LinkClose.refused(CloseCode.POLICY, Refusal(RefusalKind.FLOODING))
SLOW = LinkClose.refused(CloseCode.POLICY, Refusal(RefusalKind.SLOW_CONSUMER))
TIMED_OUT = LinkClose.refused(CloseCode.INTERNAL, Refusal(RefusalKind.CONNECTION_TIMEOUT))
DEREGISTERED = LinkClose.refused(CloseCode.POLICY, Refusal(RefusalKind.DEREGISTERED))
