"""The per-link protocol object: every decision about one authenticated link.

In the manner of h11's ``Connection`` and wsproto's ``WSConnection``, a
:class:`LinkProtocol` holds the state of one link and turns what happens to
it (a frame read, a frame being written, time passing) into small typed
values: one :data:`Verdict` per frame read, frames to send, and
:class:`~.refusals.LinkClose` decisions. It reads no clock and does no I/O:
``now`` (a monotonic time) and ``wall`` (epoch seconds, for timestamps) are
passed in. The Trio shell (:mod:`bettensor_ws.link.connection`) only moves
frames and time.

Admission order for a frame: rate, binary, size and syntax, sender,
signature, replay; then the heartbeat policy and the dispatch table decide
who consumes it.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Container
from typing import Any

import attrs

from .codec import decode_obj, encode, loads_checked
from .errors import DecodeError
from .identity import canonical_hotkey
from .messages import (
    ConfirmationMessage,
    ErrorMessage,
    HeartbeatAckMessage,
    HeartbeatMessage,
    WebSocketMessage,
)
from .ratelimit import TokenBucket
from .refusals import FLOODED, SLOW, TIMED_OUT, LinkClose, Refusal, RefusalKind, bounded
from .replay import ReplayGuard
from .signing import Signer, sign, verify
from .stats import Stats

__all__ = [
    "BATCH",
    "Answer",
    "Close",
    "ConnectionSettings",
    "Deliver",
    "Frame",
    "Ignore",
    "LinkProtocol",
    "Notice",
    "PeerLimits",
    "MINER_HOTKEY",
    "Refuse",
    "Role",
    "Verdict",
]

BATCH = "batch"
"""The feature a peer announces to send and receive batched predictions and results."""

MINER_HOTKEY = "miner_hotkey"
"""The data key by which a validator's Welcome and confirmations name the miner they answer."""

# Types the protocol consumes itself when no handler claims them; answering
# "no handler" to these could ping-pong errors between two peers.
# ``heartbeat_response`` is the reference miner's answer to a heartbeat.
SILENT_TYPES = frozenset({"error", "heartbeat_ack", "heartbeat_response", "welcome"})


class Role(enum.Enum):
    """Which side of the link this object speaks for."""

    VALIDATOR = "validator"
    MINER = "miner"


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _at_least_one(_: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{attribute.name} must be a whole number of at least 1, got {value!r}")


@attrs.define(kw_only=True)
class ConnectionSettings:
    """Limits and timings shared by every link of a manager; checked when built."""

    heartbeat_interval: float = attrs.field(default=60.0, validator=_positive)
    connection_timeout: float = attrs.field(default=300.0, validator=_positive)
    """Silence after which a link is closed 1011 "connection timeout"."""
    send_timeout: float = attrs.field(default=10.0, validator=_positive)
    """How long a write may block, or the broadcast queue stay full, before "slow consumer"."""
    max_message_size: int = attrs.field(default=1 << 20, validator=_at_least_one)
    rate_limit: float | None = attrs.field(default=None, validator=_positive)
    """Frames a second a peer may send (None: no limit)."""
    rate_burst: int = attrs.field(default=200, validator=_at_least_one)
    flood_strikes: int | None = attrs.field(default=None, validator=attrs.validators.optional(_at_least_one))
    """Rate-limit refusals (net of accepted frames) before a peer is closed for flooding;
    None: ``max(rate_burst, 20)``."""
    handler_concurrency: int = attrs.field(default=1, validator=_at_least_one)
    send_queue_size: int = attrs.field(default=256, validator=_at_least_one)
    close_timeout: float = attrs.field(default=1.0, validator=_positive)
    auth_timeout: float = attrs.field(default=10.0, validator=_positive)
    flood_after: float = attrs.field(default=10.0, validator=_positive)
    """Seconds a peer may keep its reader held back by the rate limit without a
    pause (backpressure it does not heed) before it is closed for flooding."""
    replay_window: float = attrs.field(default=300.0, validator=_positive)

    @property
    def strikes_allowed(self) -> int:
        return self.flood_strikes if self.flood_strikes is not None else max(self.rate_burst, 20)


def _announced(value: object) -> int | None:
    return value if type(value) is int and value > 0 else None


@attrs.frozen
class PeerLimits:
    """Sizes a validator announces in its Welcome; None where it said nothing
    (a reference validator)."""

    max_message_size: int | None = None
    max_prediction_bytes: int | None = None

    @classmethod
    def announced(cls, data: dict[str, Any]) -> PeerLimits:
        return cls(_announced(data.get("max_message_size")), _announced(data.get("max_prediction_bytes")))


@attrs.frozen
class Frame:
    """An encoded, signed frame; ``type`` is kept for statistics and logs."""

    type: str
    text: str

    @classmethod
    def of(cls, signed: WebSocketMessage) -> Frame:
        """A signed message, encoded once for the wire."""
        return cls(signed.type, encode(signed))


@attrs.frozen
class Deliver:
    """An admitted message for the dispatch table."""

    message: WebSocketMessage


@attrs.frozen
class Answer:
    """An admitted message the protocol answers itself (a heartbeat, with its ack)."""

    message: WebSocketMessage
    frame: Frame


@attrs.frozen
class Ignore:
    """An admitted message nobody needs to see (an error or ack with no handler)."""

    message: WebSocketMessage


@attrs.frozen
class Refuse:
    """A refused frame: why, which frame (its nonce, if readable), and the reply to send."""

    refusal: Refusal
    nonce: str | None = None
    frame: Frame | None = None


@attrs.frozen
class Close:
    """The frame ends the link (a flood)."""

    close: LinkClose


@attrs.frozen
class Notice:
    """An unsigned ``{"type": "error", "message", "timestamp"}`` from a reference
    validator: information (bounded), proof of nothing, acted on by nobody."""

    text: str


Verdict = Deliver | Answer | Ignore | Refuse | Close | Notice


def _is_reference_notice(obj: Any) -> bool:
    return (
        type(obj) is dict
        and obj.get("type") == "error"
        and isinstance(obj.get("message"), str)
        and "sender" not in obj
        and "nonce" not in obj
        and "data" not in obj
    )


class LinkProtocol:
    """One link's admission, heartbeat policy and deadlines, as functions of ``now``.

    ``handled`` is the set of message types with a handler (a live view of
    the dispatch table). ``stats`` is shared by every link of a manager and
    is counted here, by kind, in one place.
    """

    def __init__(
        self,
        *,
        role: Role,
        signer: Signer,
        peer_hotkey: str,
        settings: ConnectionSettings,
        guard: ReplayGuard,
        stats: Stats,
        now: float,
        features: frozenset[str] = frozenset(),
        handled: Container[str] = frozenset(),
        bucket: TokenBucket | None = None,
        bound: bool = False,
        peer_limits: PeerLimits | None = None,
        answer_heartbeats: bool = True,
    ) -> None:
        self.role = role
        self._signer = signer
        self.own_hotkey = canonical_hotkey(signer.ss58_address) or signer.ss58_address
        self.peer_hotkey = peer_hotkey
        self.bound = bound
        """The validator named this miner in its Welcome: its confirmations must too."""
        self.answer_heartbeats = answer_heartbeats
        """False toward a reference validator, which refuses every answer to its heartbeat."""
        self.peer_limits = peer_limits or PeerLimits()
        """What the peer said it accepts (a validator's Welcome announces it)."""
        self.settings = settings
        self.features = features
        self._guard = guard
        self._stats = stats
        self._handled = handled
        if bucket is None and settings.rate_limit:
            bucket = TokenBucket(settings.rate_limit, settings.rate_burst, now=now)
        self.bucket = bucket
        self._paced_since: float | None = None
        self.last_recv = now
        self.next_beat = now + settings.heartbeat_interval
        self.sending_since: float | None = None
        self.backlog_since: float | None = None
        self.closing: LinkClose | None = None
        self.frames_in = 0
        self.frames_out = 0

    # ---- frames in -------------------------------------------------------------------------

    def receive(self, raw: str | bytes, *, now: float, wall: float) -> Verdict:
        """Exactly one verdict for a frame the peer sent, counted where it is made."""
        self.last_recv = now
        self.frames_in += 1
        verdict = self._admit(raw, now, wall)
        if isinstance(verdict, Refuse):
            self._stats.reject(verdict.refusal.kind)
        elif isinstance(verdict, Close):
            if self.closing is None:
                self._stats.reject(RefusalKind.FLOODING)
            self.close(verdict.close)
        elif isinstance(verdict, Notice):
            self._stats.frames_in["error"] += 1
        else:
            self._stats.frames_in[verdict.message.type] += 1
        return verdict

    def _admit(self, raw: str | bytes, now: float, wall: float) -> Verdict:
        if self.closing is not None:
            # decided to end (deregistered, replaced, flooding): a frame already
            # read reaches no handler
            return Close(self.closing)
        if self.bucket is not None and not self.bucket.take(now):
            if self.bucket.strikes > self.settings.strikes_allowed:
                return Close(FLOODED)
            return self._refuse(Refusal(RefusalKind.RATE_LIMITED))
        if isinstance(raw, bytes):
            return self._refuse(Refusal(RefusalKind.BINARY))
        obj: Any = None
        try:
            obj = loads_checked(raw, max_size=self.settings.max_message_size)
            if self.role is Role.MINER and _is_reference_notice(obj):
                return Notice(bounded(obj["message"]))
            message = decode_obj(obj)
        except DecodeError as exc:
            nonce = obj.get("nonce") if isinstance(obj, dict) else None
            return self._refuse(Refusal(RefusalKind.MALFORMED, str(exc)), nonce)
        if message.sender != self.peer_hotkey and canonical_hotkey(message.sender) != self.peer_hotkey:
            return self._refuse(Refusal(RefusalKind.WRONG_SENDER), message.nonce)
        if not verify(message):
            return self._refuse(Refusal(RefusalKind.BAD_SIGNATURE), message.nonce)
        if self.role is Role.MINER and message.type == ConfirmationMessage.MESSAGE_TYPE:
            misaddressed = self._misaddressed(message.data)
            if misaddressed is not None:
                return self._refuse(misaddressed, message.nonce)
        problem = self._guard.check(self.peer_hotkey, message.nonce, message.timestamp, now=wall, mono=now)
        if problem is not None:
            return self._refuse(problem, message.nonce)
        if message.type in self._handled:
            return Deliver(message)
        if message.type == HeartbeatMessage.MESSAGE_TYPE:
            if not self.answer_heartbeats:
                # A reference validator takes any answer to its heartbeat for an
                # unknown type and sends an error back: to it, silence (our own
                # heartbeats, which it acks, keep the link alive).
                return Ignore(message)
            return Answer(message, self.sign(HeartbeatAckMessage(sender="", data={})))
        if message.type in SILENT_TYPES:
            return Ignore(message)
        # answered on both sides, as the dispatch table always has (the reference does too)
        refusal = Refusal(RefusalKind.NO_HANDLER, bounded(repr(message.type)))
        nonce = bounded(message.nonce)
        return Refuse(refusal, nonce, self._reply(refusal, nonce))

    def _misaddressed(self, data: dict[str, Any]) -> Refusal | None:
        """Why a confirmation is not ours: it names another miner, or (on a bound
        session, whose validator names its miner) none."""
        named = data.get(MINER_HOTKEY)
        if named is None:
            return Refusal(RefusalKind.MISADDRESSED, "no miner named") if self.bound else None
        if named == self.own_hotkey or (isinstance(named, str) and canonical_hotkey(named) == self.own_hotkey):
            return None
        return Refusal(RefusalKind.MISADDRESSED, bounded(named, 64))

    def read_delay(self, now: float) -> float | LinkClose:
        """How long the reader waits before it takes the peer's next frame.

        A peer above its rate is slowed, not refused: its frames are read at
        the rate, and TCP slows the sender, so a burst from a peer that never
        resends (a reference miner) loses nothing. A peer that keeps the reader
        paced without a pause for
        ``flood_after`` seconds is a flood that backpressure does not contain,
        and is closed (then cooled down).
        """
        if self.bucket is None or self.closing is not None:
            return 0.0
        wait = self.bucket.wait_for(now)
        if wait <= 0:
            self._paced_since = None  # the peer paused: it heeds the pace
            return 0.0
        if self._paced_since is None:
            self._paced_since = now
        elif now - self._paced_since > self.settings.flood_after:
            self._stats.reject(RefusalKind.FLOODING)
            return self.close(FLOODED)
        self._stats.paced_frames += 1
        return wait

    def _refuse(self, refusal: Refusal, nonce: object = None) -> Refuse:
        """Only the validator answers refused frames: two peers must not ping-pong errors."""
        kept = bounded(nonce) if isinstance(nonce, str) else None
        frame = self._reply(refusal, kept) if self.role is Role.VALIDATOR else None
        return Refuse(refusal, kept, frame)

    def _reply(self, refusal: Refusal, nonce: str | None) -> Frame:
        data: dict[str, Any] = {"message": refusal.text()}
        if nonce is not None:
            data["refused_nonce"] = nonce
        return self.sign(ErrorMessage(sender="", data=data))

    # ---- frames out ------------------------------------------------------------------------

    def sign(self, message: WebSocketMessage) -> Frame:
        """``message`` signed with this side's key and encoded for the wire.

        A validator's confirmation names the miner it answers (``miner_hotkey``),
        under the signature: relayed to anyone else, it is refused.
        """
        if (
            self.role is Role.VALIDATOR
            and message.type == ConfirmationMessage.MESSAGE_TYPE
            and message.data.get(MINER_HOTKEY) != self.peer_hotkey
        ):
            message = copy.copy(message)
            message.data = {**message.data, MINER_HOTKEY: self.peer_hotkey}
        return Frame.of(sign(message, self._signer))

    def send_started(self, now: float) -> None:
        """The writer began a write; one that blocks for ``send_timeout`` is a slow consumer."""
        self.sending_since = now

    def send_finished(self, frame: Frame) -> None:
        self.sending_since = None
        self.frames_out += 1
        self._stats.frames_out[frame.type] += 1

    def backlog(self, now: float, *, full: bool) -> None:
        """Whether the broadcast queue is full; full for ``send_timeout`` is a slow consumer."""
        if not full:
            self.backlog_since = None
        elif self.backlog_since is None:
            self.backlog_since = now

    def broadcast_dropped(self, now: float) -> None:
        """A broadcast found the queue full and was dropped for this peer."""
        self._stats.dropped_broadcasts += 1
        self.backlog(now, full=True)

    def overflowed(self) -> LinkClose:
        """Answers could not even be queued: the peer is not reading them."""
        return self._slow_consumer()

    def _slow_consumer(self) -> LinkClose:
        if self.closing is None:
            self._stats.reject(RefusalKind.SLOW_CONSUMER)
        return self.close(SLOW)

    # ---- time ------------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When :meth:`poll` next has something to do (it may also have nothing then)."""
        deadlines = [self.next_beat, self.last_recv + self.settings.connection_timeout]
        for since in (self.sending_since, self.backlog_since):
            if since is not None:
                deadlines.append(since + self.settings.send_timeout)
        return min(deadlines)

    def poll(self, now: float) -> Frame | LinkClose | None:
        """What time demands now: a close, a heartbeat to send, or nothing yet."""
        if self.closing is not None:
            return self.closing
        if now >= self.last_recv + self.settings.connection_timeout:
            self._stats.reject(RefusalKind.CONNECTION_TIMEOUT)
            return self.close(TIMED_OUT)
        for since in (self.sending_since, self.backlog_since):
            if since is not None and now >= since + self.settings.send_timeout:
                return self._slow_consumer()
        if now >= self.next_beat:
            self.next_beat = now + self.settings.heartbeat_interval
            return self.sign(HeartbeatMessage(sender="", data={}))
        return None

    # ---- the end ---------------------------------------------------------------------------

    def close(self, close: LinkClose) -> LinkClose:
        """Decide to end the link; the first decision wins and is returned."""
        if self.closing is None:
            self.closing = close
        return self.closing

    def may_flush(self) -> bool:
        """Whether queued frames should still be written before the close frame.

        Not to a slow consumer: it is not reading, and waiting on it would only
        delay the close.
        """
        return self.closing is None or self.closing.kind is not RefusalKind.SLOW_CONSUMER
