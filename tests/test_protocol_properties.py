"""Hypothesis state machine over a validator-side and a miner-side LinkProtocol.

The two objects exchange frames made by each other's ``sign``; the test
controls both clocks: ``now`` is passed to ``receive`` and the wall clock is
both passed as ``wall`` and used for the timestamps ``sign`` writes (the
signing module's ``now_iso`` is patched for the length of each example). A
small model of each replay guard (nonce -> expiry) predicts every verdict
exactly; the invariants check what must hold whatever the steps were.

sr25519 signing and verifying cost about 60 us each, so the machine runs 30
examples of 30 steps.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Sized
from datetime import UTC, datetime
from typing import Any
from unittest import mock

import attrs
from bittensor_wallet import Keypair
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bettensor_ws.protocol import signing
from bettensor_ws.protocol.codec import decode, encode
from bettensor_ws.protocol.link import (
    Answer,
    Close,
    ConnectionSettings,
    Deliver,
    Frame,
    Ignore,
    LinkProtocol,
    PeerLimits,
    Refuse,
    Role,
    Verdict,
)
from bettensor_ws.protocol.messages import (
    ErrorMessage,
    HeartbeatMessage,
    PredictionMessage,
    WebSocketMessage,
    message_types,
)
from bettensor_ws.protocol.ratelimit import TokenBucket
from bettensor_ws.protocol.refusals import LinkClose, RefusalKind
from bettensor_ws.protocol.replay import ReplayGuard, parse_timestamp
from bettensor_ws.protocol.stats import Stats
from tests.helpers import prediction_data

VALIDATOR_KEY = Keypair.create_from_uri("//Alice")
MINER_KEY = Keypair.create_from_uri("//Bob")
MALLORY = Keypair.create_from_uri("//Mallory")

WINDOW = 300.0
MAX_ENTRIES = 12  # small, so the guards fill up within an example
MAX_SIZE = 4096
START_WALL = 1_725_000_000.0

SETTINGS = ConnectionSettings(max_message_size=MAX_SIZE, replay_window=WINDOW, rate_limit=None)

VERDICTS = (Deliver, Answer, Ignore, Refuse, Close)
KEYS = frozenset(k.key for k in RefusalKind)
ADMITTED = (Deliver, Answer, Ignore)

# What a LinkProtocol may hold: scalars, its settings, the shared guard and
# stats (bounded on their own), and fixed containers given at construction.
SCALARS: tuple[type, ...] = (
    type(None),
    bool,
    int,
    float,
    str,
    enum.Enum,
    LinkClose,
    ConnectionSettings,
    ReplayGuard,
    Stats,
    TokenBucket,
    PeerLimits,
    frozenset,
    Keypair,
)


def iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat()


def prediction(n: int) -> PredictionMessage:
    return PredictionMessage(
        sender="",
        data=prediction_data(f"p{n}"),
    )


def envelope(text: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(text)
    return obj


@attrs.define
class Side:
    """One receiving end, its peer (who signs what it reads) and a model of its guard."""

    name: str
    proto: LinkProtocol
    peer: LinkProtocol
    guard: ReplayGuard
    stats: Stats
    seen: dict[str, int] = attrs.Factory(dict)
    """The guard's model: nonce -> the second of its timestamp."""
    buckets: dict[int, tuple[float, float]] = attrs.Factory(dict)
    """Per second of timestamps held: when it leaves the window, by the monotonic and
    the wall clock (the guard forgets a second only when both say so, in that order)."""
    admitted: set[str] = attrs.Factory(set)
    """Texts this side admitted (delivered, answered or ignored)."""
    received: int = 0
    initial: dict[str, Any] = attrs.Factory(dict)

    def fresh(self, n: int) -> Frame:
        """A new valid frame from the peer: predictions to the validator, heartbeats to the miner."""
        if self.proto.role is Role.VALIDATOR:
            return self.peer.sign(prediction(n))
        return self.peer.sign(HeartbeatMessage(sender="", data={"n": n}))


def shape(proto: LinkProtocol) -> dict[str, Any]:
    """Every attribute's type, and the size of the sized ones (but the shared guard's,
    which is bounded by its ``max_entries``, checked on its own)."""
    return {
        name: (
            type(value),
            len(value) if isinstance(value, Sized) and not isinstance(value, ReplayGuard) else None,
        )
        for name, value in vars(proto).items()
    }


class LinkPair(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.wall = START_WALL
        self._clock = mock.patch.object(signing, "now_iso", lambda: iso(self.wall))
        self._clock.start()
        self.sides: dict[str, Side] = {}
        for name, role, key, peer_key in (
            ("validator", Role.VALIDATOR, VALIDATOR_KEY, MINER_KEY),
            ("miner", Role.MINER, MINER_KEY, VALIDATOR_KEY),
        ):
            guard = ReplayGuard(WINDOW, max_entries=MAX_ENTRIES)
            stats = Stats()
            proto = LinkProtocol(
                role=role,
                signer=key,
                peer_hotkey=peer_key.ss58_address,
                settings=SETTINGS,
                guard=guard,
                stats=stats,
                now=self.now,
                handled=frozenset({"prediction"}) if role is Role.VALIDATOR else frozenset(),
            )
            # the peer is filled in below, once both exist
            self.sides[name] = Side(name, proto, proto, guard, stats, initial=shape(proto))
        self.sides["validator"].peer = self.sides["miner"].proto
        self.sides["miner"].peer = self.sides["validator"].proto
        self.delivered: list[tuple[str, str]] = []  # (side, text) admitted at least once
        self.held: list[tuple[str, str]] = []  # (side, text) signed, not yet received
        self.counter = 0

    def teardown(self) -> None:
        self._clock.stop()

    # ---- the model ---------------------------------------------------------------------------

    def expected(self, side: Side, text: str) -> RefusalKind | None:
        """The guard's verdict on a valid frame from the peer, by the model; recorded if None."""
        obj = envelope(text)
        sent_at = parse_timestamp(obj["timestamp"])
        if sent_at < self.wall - WINDOW:
            return RefusalKind.STALE_TIMESTAMP
        if sent_at > self.wall + WINDOW:
            return RefusalKind.FUTURE_TIMESTAMP
        for second, (mono_expiry, wall_expiry) in list(side.buckets.items()):
            if mono_expiry > self.now:
                continue
            if wall_expiry > self.wall:  # the wall clock is behind: looked at again later
                side.buckets[second] = (self.now + (wall_expiry - self.wall), wall_expiry)
                continue
            del side.buckets[second]
            side.seen = {n: s for n, s in side.seen.items() if s != second}
        if obj["nonce"] in side.seen:
            return RefusalKind.REPLAYED_NONCE
        if len(side.seen) >= MAX_ENTRIES:
            event("replay guard full")
            return RefusalKind.REPLAY_GUARD_FULL
        second = math.floor(sent_at)
        if second not in side.buckets:
            wall_expiry = second + 1 + WINDOW
            side.buckets[second] = (self.now + (wall_expiry - self.wall), wall_expiry)
        side.seen[obj["nonce"]] = second
        return None

    def receive(self, side: Side, raw: str | bytes) -> Verdict:
        """Feed one frame; check what holds for every verdict."""
        verdict = side.proto.receive(raw, now=self.now, wall=self.wall)
        side.received += 1
        assert isinstance(verdict, VERDICTS), verdict
        shown = verdict.refusal.kind.key if isinstance(verdict, Refuse) else type(verdict).__name__
        event(f"{side.name}: {shown}")
        if isinstance(raw, str) and raw in side.admitted:
            assert isinstance(verdict, Refuse), "a frame was admitted twice"
        if isinstance(verdict, ADMITTED):
            assert isinstance(raw, str)
            side.admitted.add(raw)
            self.delivered.append((side.name, raw))
        if isinstance(verdict, Refuse):
            if side.proto.role is Role.VALIDATOR:
                assert verdict.frame is not None
                reply = decode(verdict.frame.text)
                assert isinstance(reply, ErrorMessage)
                assert reply.sender == VALIDATOR_KEY.ss58_address
                assert reply.message == verdict.refusal.text()
                assert reply.data.get("refused_nonce") == verdict.nonce
            else:
                assert verdict.frame is None
        return verdict

    def expect_admission(self, side: Side, text: str, admitted: type) -> None:
        """Receive a valid frame from the peer and check the verdict the model predicts."""
        kind = self.expected(side, text)
        verdict = self.receive(side, text)
        if kind is None:
            assert isinstance(verdict, admitted) and isinstance(verdict, ADMITTED), (verdict, admitted)
            assert verdict.message.nonce == envelope(text)["nonce"]
        else:
            assert isinstance(verdict, Refuse), (verdict, kind)
            assert verdict.refusal.kind is kind, (verdict.refusal, kind)
            assert verdict.nonce == envelope(text)["nonce"]

    def admitted_type(self, side: Side, text: str) -> type:
        kind = envelope(text)["type"]
        if kind in side.proto._handled:
            return Deliver
        return Answer if kind == "heartbeat" else Ignore

    # ---- rules -------------------------------------------------------------------------------

    @rule(count=st.integers(1, 3))
    def miner_sends_predictions(self, count: int) -> None:
        side = self.sides["validator"]
        for _ in range(count):
            self.counter += 1
            self.expect_admission(side, side.fresh(self.counter).text, Deliver)

    @rule()
    def validator_sends_heartbeat(self) -> None:
        miner, validator = self.sides["miner"], self.sides["validator"]
        beat = validator.proto.sign(HeartbeatMessage(sender="", data={}))
        kind = self.expected(miner, beat.text)
        answer = self.receive(miner, beat.text)
        if kind is not None:
            assert isinstance(answer, Refuse) and answer.refusal.kind is kind
            return
        assert isinstance(answer, Answer)
        assert answer.frame.type == "heartbeat_ack"
        self.expect_admission(validator, answer.frame.text, Ignore)

    @precondition(lambda self: bool(self.delivered))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        name, text = data.draw(st.sampled_from(self.delivered), label="replayed")
        side = self.sides[name]
        kind = self.expected(side, text)
        assert kind in (RefusalKind.REPLAYED_NONCE, RefusalKind.STALE_TIMESTAMP), kind
        verdict = self.receive(side, text)
        assert isinstance(verdict, Refuse) and verdict.refusal.kind is kind

    @rule(name=st.sampled_from(["validator", "miner"]))
    def hold(self, name: str) -> None:
        self.counter += 1
        self.held.append((name, self.sides[name].fresh(self.counter).text))

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def deliver_held(self, data: st.DataObject) -> None:
        """A frame signed earlier arrives late (maybe again): the model says if it still may."""
        name, text = data.draw(st.sampled_from(self.held), label="held")
        side = self.sides[name]
        self.expect_admission(side, text, self.admitted_type(side, text))

    @rule(
        name=st.sampled_from(["validator", "miner"]),
        skew=st.floats(-2 * WINDOW, 2 * WINDOW, allow_nan=False),
    )
    def skewed_sender(self, name: str, skew: float) -> None:
        """The peer's clock is ``skew`` seconds off: future or stale beyond the window."""
        side = self.sides[name]
        self.counter += 1
        wall, self.wall = self.wall, self.wall + skew  # the peer signs on its own clock
        try:
            text = side.fresh(self.counter).text
        finally:
            self.wall = wall
        self.expect_admission(side, text, self.admitted_type(side, text))

    @rule(
        name=st.sampled_from(["validator", "miner"]),
        raw=st.one_of(st.binary(max_size=100), st.text(max_size=50)),
    )
    def garbage(self, name: str, raw: str | bytes) -> None:
        verdict = self.receive(self.sides[name], raw)
        assert isinstance(verdict, Refuse)
        expected = RefusalKind.BINARY if isinstance(raw, bytes) else RefusalKind.MALFORMED
        assert verdict.refusal.kind is expected
        # text that happens to be a JSON object with a "nonce" would name it
        assert verdict.nonce is None or (isinstance(raw, str) and "nonce" in raw)

    @rule(name=st.sampled_from(["validator", "miner"]), data=st.data())
    def truncated(self, name: str, data: st.DataObject) -> None:
        side = self.sides[name]
        self.counter += 1
        text = side.fresh(self.counter).text
        cut = data.draw(st.integers(0, len(text) - 1), label="cut")
        verdict = self.receive(side, text[:cut])
        assert isinstance(verdict, Refuse) and verdict.refusal.kind is RefusalKind.MALFORMED
        assert verdict.nonce is None

    @rule(
        name=st.sampled_from(["validator", "miner"]),
        field=st.sampled_from(["type", "sender", "data", "timestamp", "nonce", "signature"]),
        data=st.data(),
    )
    def wrong_field_type(self, name: str, field: str, data: st.DataObject) -> None:
        side = self.sides[name]
        self.counter += 1
        obj = envelope(side.fresh(self.counter).text)
        wrong: list[Any] = [0, 1.5, True, [], ["x"], {"a": 1}]
        if field == "data":
            wrong = [0, 1.5, True, None, "x", [], ["x"]]
        elif field != "signature":
            wrong.append(None)  # a missing signature may be null; nothing else may
        obj[field] = data.draw(st.sampled_from(wrong), label="value")
        verdict = self.receive(side, json.dumps(obj))
        assert isinstance(verdict, Refuse) and verdict.refusal.kind is RefusalKind.MALFORMED
        assert verdict.nonce == (obj["nonce"] if field != "nonce" else None)

    @rule(name=st.sampled_from(["validator", "miner"]), extra=st.integers(0, 2000), wide=st.booleans())
    def oversized(self, name: str, extra: int, wide: bool) -> None:
        """A valid heartbeat padded to ``extra`` bytes past the limit (0: exactly at it)."""
        side = self.sides[name]
        unit = "é" if wide else "x"  # two bytes of UTF-8 a character, or one
        base = len(side.peer.sign(HeartbeatMessage(sender="", data={"pad": ""})).text.encode())
        room = MAX_SIZE - base + extra
        if wide and room % 2:
            room += 1  # whole characters only: one byte more
        text = side.peer.sign(HeartbeatMessage(sender="", data={"pad": unit * (room // len(unit.encode()))})).text
        size = len(text.encode())
        assert size == base + room
        if size <= MAX_SIZE:
            self.expect_admission(side, text, Answer)
            return
        verdict = self.receive(side, text)
        assert isinstance(verdict, Refuse) and verdict.refusal.kind is RefusalKind.MALFORMED
        assert "over the limit" in verdict.refusal.text()
        assert verdict.nonce is None

    @rule(name=st.sampled_from(["validator", "miner"]), forged=st.booleans())
    def wrong_key(self, name: str, forged: bool) -> None:
        """Signed by //Mallory: as herself (wrong sender), or claiming the peer's hotkey."""
        side = self.sides[name]
        message: WebSocketMessage = HeartbeatMessage(sender="", data={})
        obj = envelope(encode(signing.sign(message, MALLORY)))
        if forged:
            obj["sender"] = side.peer._signer.ss58_address
        verdict = self.receive(side, json.dumps(obj))
        assert isinstance(verdict, Refuse)
        expected = RefusalKind.BAD_SIGNATURE if forged else RefusalKind.WRONG_SENDER
        assert verdict.refusal.kind is expected
        assert verdict.nonce == obj["nonce"]

    @rule(
        step=st.one_of(
            st.floats(0, 60, allow_nan=False),
            st.just(WINDOW),
            st.floats(WINDOW - 1, WINDOW + 1, allow_nan=False),
            st.floats(WINDOW, 3 * WINDOW, allow_nan=False),
        )
    )
    def clock_moves(self, step: float) -> None:
        self.now += step
        self.wall += step

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def stats_are_keyed_by_kind(self) -> None:
        for side in self.sides.values():
            assert set(side.stats.rejections) <= KEYS
            assert set(side.stats.frames_in) <= set(message_types())
            # one count per frame read: admitted by type, refused by kind
            counted = sum(side.stats.rejections.values()) + sum(side.stats.frames_in.values())
            assert counted == side.received == side.proto.frames_in

    @invariant()
    def memory_is_bounded(self) -> None:
        for side in self.sides.values():
            assert len(side.guard) <= side.guard.max_entries
            assert shape(side.proto) == side.initial, "LinkProtocol's state changed shape"
            for name, value in vars(side.proto).items():
                assert isinstance(value, SCALARS), (name, type(value))

    @invariant()
    def no_close_without_a_rate_limit(self) -> None:
        for side in self.sides.values():
            assert side.proto.closing is None
            assert side.proto.may_flush()


LinkPair.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
TestLinkPair = LinkPair.TestCase


# ---- with a rate limit -------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    rate=st.floats(0.5, 20, allow_nan=False),
    burst=st.integers(1, 5),
    strikes=st.none() | st.integers(1, 6),
    gaps=st.lists(st.just(0.0) | st.floats(0, 1, allow_nan=False), min_size=5, max_size=40),
    role=st.sampled_from([Role.VALIDATOR, Role.MINER]),
)
def test_rate_limited_refusals_never_exceed_frames_sent(
    rate: float, burst: int, strikes: int | None, gaps: list[float], role: Role
) -> None:
    config = attrs.evolve(SETTINGS, rate_limit=rate, rate_burst=burst, flood_strikes=strikes)
    key, peer_key = (VALIDATOR_KEY, MINER_KEY) if role is Role.VALIDATOR else (MINER_KEY, VALIDATOR_KEY)
    stats = Stats()
    proto = LinkProtocol(
        role=role,
        signer=key,
        peer_hotkey=peer_key.ss58_address,
        settings=config,
        guard=ReplayGuard(WINDOW),
        stats=stats,
        now=0.0,
    )
    peer = LinkProtocol(
        role=Role.MINER if role is Role.VALIDATOR else Role.VALIDATOR,
        signer=peer_key,
        peer_hotkey=key.ss58_address,
        settings=SETTINGS,
        guard=ReplayGuard(WINDOW),
        stats=Stats(),
        now=0.0,
    )
    now = 0.0
    sent = limited = closes = 0
    for gap in gaps:
        now += gap
        frame = peer.sign(HeartbeatMessage(sender="", data={}))
        verdict = proto.receive(frame.text, now=now, wall=parse_timestamp(envelope(frame.text)["timestamp"]))
        sent += 1
        assert isinstance(verdict, VERDICTS)
        if isinstance(verdict, Refuse):
            assert verdict.refusal.kind is RefusalKind.RATE_LIMITED
            assert (verdict.frame is not None) is (role is Role.VALIDATOR)
            limited += 1
        elif isinstance(verdict, Close):
            # a flooder is closed only after more strikes than allowed
            assert closes or limited >= config.strikes_allowed
            closes += 1
        else:
            assert isinstance(verdict, Answer)
        assert sum(stats.rejections.values()) <= sent
        assert stats.rejections["rate limited"] == limited <= sent
        assert stats.rejections["flooding"] == min(closes, 1)
        assert set(stats.rejections) <= KEYS
    # every frame counted once, but a close only the first time it is decided
    counted = sum(stats.rejections.values()) + sum(stats.frames_in.values())
    assert counted == sent - max(closes - 1, 0)
    event("closed for flooding" if closes else "rate limited" if limited else "never limited")

