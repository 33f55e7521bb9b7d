"""LinkProtocol, the sans-IO per-link object, driven with explicit times.

A validator-side and a miner-side object exchange frames made by each other's
``sign``: no sockets, no trio, no sleeps. ``now`` is a monotonic time chosen
by the test; ``wall`` is given relative to the timestamp a frame carries
(:func:`sent_at`), so the replay window is exercised exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from bittensor_wallet import Keypair

from bettensor_ws.protocol.codec import decode, encode
from bettensor_ws.protocol.link import (
    Answer,
    Close,
    ConnectionSettings,
    Deliver,
    Frame,
    Ignore,
    LinkProtocol,
    Refuse,
    Role,
)
from bettensor_ws.protocol.messages import (
    ConfirmationMessage,
    ErrorMessage,
    HeartbeatAckMessage,
    HeartbeatMessage,
    PredictionMessage,
    WebSocketMessage,
    WelcomeMessage,
)
from bettensor_ws.protocol.refusals import (
    FLOODED,
    GOING_AWAY,
    SLOW,
    TIMED_OUT,
    CloseCode,
    RefusalKind,
)
from bettensor_ws.protocol.replay import ReplayGuard, parse_timestamp
from bettensor_ws.protocol.signing import sign, verify
from bettensor_ws.protocol.stats import Stats
from tests.helpers import prediction_data

REPO = Path(__file__).resolve().parent.parent

VALIDATOR_KEY = Keypair.create_from_uri("//Alice")
MINER_KEY = Keypair.create_from_uri("//Bob")
MALLORY = Keypair.create_from_uri("//Mallory")

WINDOW = 300.0
T0 = 1000.0  # the monotonic time both objects are created at

SETTINGS = ConnectionSettings(
    heartbeat_interval=10.0, connection_timeout=35.0, send_timeout=5.0, replay_window=WINDOW
)


def make(
    role: Role,
    *,
    settings: ConnectionSettings = SETTINGS,
    handled: frozenset[str] = frozenset(),
    now: float = T0,
) -> LinkProtocol:
    """One side of a validator (//Alice) to miner (//Bob) link."""
    signer, peer = (
        (VALIDATOR_KEY, MINER_KEY) if role is Role.VALIDATOR else (MINER_KEY, VALIDATOR_KEY)
    )
    return LinkProtocol(
        role=role,
        signer=signer,
        peer_hotkey=peer.ss58_address,
        settings=settings,
        guard=ReplayGuard(settings.replay_window),
        stats=Stats(),
        now=now,
        handled=handled,
    )


def validator(**kwargs: Any) -> LinkProtocol:
    return make(Role.VALIDATOR, **{"handled": frozenset({"prediction"}), **kwargs})


def miner(**kwargs: Any) -> LinkProtocol:
    return make(Role.MINER, **kwargs)


def pair(role: Role) -> tuple[LinkProtocol, LinkProtocol]:
    """(receiver, sender): the side under test speaks for ``role``, the other is its peer."""
    if role is Role.VALIDATOR:
        return validator(), miner()
    return miner(), validator()


def prediction(prediction_id: str = "p1") -> PredictionMessage:
    return PredictionMessage(
        sender="",
        data=prediction_data(prediction_id),
    )


def heartbeat(n: int = 1) -> HeartbeatMessage:
    return HeartbeatMessage(sender="", data={"n": n})


def sent_at(frame: Frame | str) -> float:
    """Epoch seconds of the timestamp a frame carries."""
    text = frame.text if isinstance(frame, Frame) else frame
    return parse_timestamp(json.loads(text)["timestamp"])


def nonce_of(frame: Frame) -> str:
    nonce: str = json.loads(frame.text)["nonce"]
    return nonce


def check_reply(reply: Frame, by: LinkProtocol, text: str, refused_nonce: str | None) -> None:
    """``reply`` is an error frame signed by ``by`` saying ``text``, naming the nonce if any."""
    assert reply.type == "error"
    message = decode(reply.text)
    assert isinstance(message, ErrorMessage)
    assert verify(message)
    assert message.sender == by._signer.ss58_address
    assert message.message == text
    if refused_nonce is None:
        assert "refused_nonce" not in message.data
    else:
        assert message.data["refused_nonce"] == refused_nonce


BOTH_ROLES = pytest.mark.parametrize("role", [Role.VALIDATOR, Role.MINER], ids=["validator", "miner"])


# ---- admitted frames -------------------------------------------------------------------------


def test_prediction_is_delivered_to_the_validator() -> None:
    v, m = validator(), miner()
    frame = m.sign(prediction("p9"))
    assert frame.type == "prediction"
    verdict = v.receive(frame.text, now=T0 + 1, wall=sent_at(frame))
    assert isinstance(verdict, Deliver)
    assert isinstance(verdict.message, PredictionMessage)
    assert verdict.message.sender == MINER_KEY.ss58_address
    assert verdict.message.nonce == nonce_of(frame)
    assert verdict.message.prediction.prediction_id == "p9"
    assert v._stats.frames_in == {"prediction": 1}
    assert v._stats.rejections == {}
    assert v.frames_in == 1


def test_a_handled_type_is_delivered_even_when_the_protocol_could_answer_it() -> None:
    m = miner(handled=frozenset({"heartbeat"}))
    frame = validator().sign(heartbeat())
    assert isinstance(m.receive(frame.text, now=T0, wall=sent_at(frame)), Deliver)


@BOTH_ROLES
def test_heartbeat_is_answered_and_the_ack_ignored(role: Role) -> None:
    receiver, sender = pair(role)
    beat = sender.sign(heartbeat())
    answer = receiver.receive(beat.text, now=T0 + 1, wall=sent_at(beat))
    assert isinstance(answer, Answer)
    assert answer.message.type == "heartbeat"
    assert answer.frame.type == "heartbeat_ack"
    ack = decode(answer.frame.text)
    assert isinstance(ack, HeartbeatAckMessage) and verify(ack)
    assert ack.sender == receiver._signer.ss58_address

    ignored = sender.receive(answer.frame.text, now=T0 + 2, wall=sent_at(answer.frame))
    assert isinstance(ignored, Ignore)
    assert ignored.message.type == "heartbeat_ack"
    assert receiver._stats.frames_in == {"heartbeat": 1}
    assert sender._stats.frames_in == {"heartbeat_ack": 1}
    assert receiver._stats.rejections == {} and sender._stats.rejections == {}


@BOTH_ROLES
@pytest.mark.parametrize(
    "message",
    [
        ErrorMessage(sender="", data={"message": "rate limited"}),
        WelcomeMessage(sender="", data={"features": ["batch"]}),
        HeartbeatAckMessage(sender="", data={}),
    ],
    ids=lambda m: m.type,
)
def test_silent_types_without_a_handler_are_ignored(role: Role, message: WebSocketMessage) -> None:
    receiver, sender = pair(role)
    frame = sender.sign(message)
    verdict = receiver.receive(frame.text, now=T0, wall=sent_at(frame))
    assert isinstance(verdict, Ignore)
    assert verdict.message.type == message.type
    assert receiver._stats.rejections == {}


@BOTH_ROLES
def test_a_decodable_type_without_a_handler_is_refused_with_a_reply(role: Role) -> None:
    receiver, sender = pair(role)
    frame = sender.sign(ConfirmationMessage(sender="", data={"status": "success", "prediction_id": "p1"}))
    verdict = receiver.receive(frame.text, now=T0, wall=sent_at(frame))
    assert isinstance(verdict, Refuse)
    assert verdict.refusal.kind is RefusalKind.NO_HANDLER
    assert verdict.nonce == nonce_of(frame)
    # both roles answer this one: it is a verdict on the type, not an error ping-pong
    assert verdict.frame is not None
    check_reply(
        verdict.frame, receiver, "No handler registered for message type 'confirmation'", nonce_of(frame)
    )
    assert receiver._stats.rejections == {"no handler": 1}
    assert receiver._stats.frames_in == {}


# ---- refused frames --------------------------------------------------------------------------


def tampered(frame: Frame) -> str:
    obj = json.loads(frame.text)
    obj["data"]["n"] += 1
    return json.dumps(obj)


def wrong_types(frame: Frame) -> str:
    obj = json.loads(frame.text)
    obj["data"] = ["not", "an", "object"]
    return json.dumps(obj)


Case = Callable[[LinkProtocol, LinkProtocol], tuple[str | bytes, float, bool]]
"""(receiver, sender) -> (what the receiver reads, the wall time, whether the nonce is readable)."""


def binary(r: LinkProtocol, s: LinkProtocol) -> tuple[str | bytes, float, bool]:
    frame = s.sign(heartbeat())
    return frame.text.encode(), sent_at(frame), False


def invalid_json(r: LinkProtocol, s: LinkProtocol) -> tuple[str | bytes, float, bool]:
    frame = s.sign(heartbeat())
    return frame.text[:-1], sent_at(frame), False


def malformed_with_nonce(r: LinkProtocol, s: LinkProtocol) -> tuple[str | bytes, float, bool]:
    frame = s.sign(heartbeat())
    return wrong_types(frame), sent_at(frame), True


def wrong_sender(r: LinkProtocol, s: LinkProtocol) -> tuple[str | bytes, float, bool]:
    """A well-signed frame, but by //Mallory, not the authenticated peer."""
    frame = Frame("heartbeat", encode(sign(heartbeat(), MALLORY)))
    return frame.text, sent_at(frame), True


def bad_signature(r: LinkProtocol, s: LinkProtocol) -> tuple[str | bytes, float, bool]:
    frame = s.sign(heartbeat())
    return tampered(frame), sent_at(frame), True


def stale(r: LinkProtocol, s: LinkProtocol) -> tuple[str | bytes, float, bool]:
    frame = s.sign(heartbeat())
    return frame.text, sent_at(frame) + WINDOW + 60, True


def future(r: LinkProtocol, s: LinkProtocol) -> tuple[str | bytes, float, bool]:
    frame = s.sign(heartbeat())
    return frame.text, sent_at(frame) - WINDOW - 60, True


def replayed(r: LinkProtocol, s: LinkProtocol) -> tuple[str | bytes, float, bool]:
    frame = s.sign(heartbeat())
    first = r.receive(frame.text, now=T0, wall=sent_at(frame))
    assert isinstance(first, Answer)
    r._stats.frames_in.clear()
    return frame.text, sent_at(frame) + 1, True


REFUSALS: list[tuple[Case, RefusalKind]] = [
    (binary, RefusalKind.BINARY),
    (invalid_json, RefusalKind.MALFORMED),
    (malformed_with_nonce, RefusalKind.MALFORMED),
    (wrong_sender, RefusalKind.WRONG_SENDER),
    (bad_signature, RefusalKind.BAD_SIGNATURE),
    (replayed, RefusalKind.REPLAYED_NONCE),
    (stale, RefusalKind.STALE_TIMESTAMP),
    (future, RefusalKind.FUTURE_TIMESTAMP),
]


@BOTH_ROLES
@pytest.mark.parametrize(("case", "kind"), REFUSALS, ids=[c.__name__ for c, _ in REFUSALS])
def test_refused_frames(role: Role, case: Case, kind: RefusalKind) -> None:
    receiver, sender = pair(role)
    raw, wall, nonce_readable = case(receiver, sender)
    expected_nonce = json.loads(raw)["nonce"] if nonce_readable else None

    verdict = receiver.receive(raw, now=T0 + 2, wall=wall)

    assert isinstance(verdict, Refuse)
    assert verdict.refusal.kind is kind
    assert verdict.nonce == expected_nonce
    if role is Role.VALIDATOR:
        assert verdict.frame is not None
        check_reply(verdict.frame, receiver, verdict.refusal.text(), expected_nonce)
    else:
        assert verdict.frame is None  # a miner never answers refusals: no error ping-pong
    # counted once, by kind: never by the text (a stale timestamp's text carries its age)
    assert receiver._stats.rejections == {kind.key: 1}
    assert receiver._stats.frames_in == {}
    assert receiver.closing is None


def test_a_refused_reply_is_itself_accepted_by_the_miner() -> None:
    """The validator's error reply to a miner's bad frame is a valid, ignored frame for the miner."""
    v, m = validator(), miner()
    frame = m.sign(heartbeat())
    refused = v.receive(tampered(frame), now=T0, wall=sent_at(frame))
    assert isinstance(refused, Refuse) and refused.frame is not None
    assert isinstance(m.receive(refused.frame.text, now=T0, wall=sent_at(refused.frame)), Ignore)


# ---- rate limiting ---------------------------------------------------------------------------


@BOTH_ROLES
def test_rate_limit_refuses_then_closes_a_flooder(role: Role) -> None:
    settings = attrs.evolve(SETTINGS, rate_limit=1, rate_burst=2)
    receiver = make(role, settings=settings, handled=frozenset({"heartbeat"}))
    sender = miner() if role is Role.VALIDATOR else validator()
    allowed = settings.strikes_allowed
    assert allowed == 20

    frames = [sender.sign(heartbeat(i)) for i in range(2 + allowed + 2)]
    wall = sent_at(frames[0])
    now = T0  # no time passes: the bucket never refills
    verdicts = [receiver.receive(f.text, now=now, wall=wall) for f in frames]

    assert all(isinstance(v, Deliver) for v in verdicts[:2])
    limited = verdicts[2 : 2 + allowed]
    for verdict in limited:
        assert isinstance(verdict, Refuse)
        assert verdict.refusal.kind is RefusalKind.RATE_LIMITED
        assert verdict.nonce is None  # refused before it was read
        if role is Role.VALIDATOR:
            assert verdict.frame is not None
            check_reply(verdict.frame, receiver, "rate limited", None)
        else:
            assert verdict.frame is None
    closes = verdicts[2 + allowed :]
    assert closes == [Close(FLOODED), Close(FLOODED)]
    assert FLOODED.code == CloseCode.POLICY and FLOODED.reason == "rate limit exceeded"
    assert receiver.closing == FLOODED
    assert receiver._stats.rejections == {"rate limited": allowed, "flooding": 1}
    assert receiver.poll(now) == FLOODED
    assert receiver.may_flush()


def test_rate_limit_refills_with_time() -> None:
    settings = attrs.evolve(SETTINGS, rate_limit=1, rate_burst=2)
    v = validator(settings=settings)
    m = miner()
    frames = [m.sign(prediction(f"p{i}")) for i in range(4)]
    wall = sent_at(frames[0])
    assert isinstance(v.receive(frames[0].text, now=T0, wall=wall), Deliver)
    assert isinstance(v.receive(frames[1].text, now=T0, wall=wall), Deliver)
    refused = v.receive(frames[2].text, now=T0, wall=wall)
    assert isinstance(refused, Refuse) and refused.refusal.kind is RefusalKind.RATE_LIMITED
    # the refused frame was not recorded by the replay guard: sent again later, it is accepted
    assert isinstance(v.receive(frames[2].text, now=T0 + 1, wall=wall + 1), Deliver)
    assert v._stats.rejections == {"rate limited": 1}


# ---- time: heartbeats, timeouts, slow consumers ----------------------------------------------


def test_heartbeat_deadline() -> None:
    p = validator()
    assert p.next_deadline() == T0 + 10
    assert p.poll(T0) is None
    assert p.poll(T0 + 9.999) is None

    beat = p.poll(T0 + 10)
    assert isinstance(beat, Frame) and beat.type == "heartbeat"
    message = decode(beat.text)
    assert isinstance(message, HeartbeatMessage) and verify(message)
    assert message.sender == VALIDATOR_KEY.ss58_address
    assert p.next_deadline() == T0 + 20
    assert p.poll(T0 + 10) is None  # the beat moved on

    late = p.poll(T0 + 23)  # a late poll beats once and schedules from then
    assert isinstance(late, Frame)
    assert p.next_deadline() == T0 + 33
    assert p._stats.rejections == {}
    assert p.closing is None


def test_the_miner_answers_the_validators_polled_heartbeat() -> None:
    v, m = validator(), miner()
    beat = v.poll(T0 + 10)
    assert isinstance(beat, Frame)
    answer = m.receive(beat.text, now=T0 + 10, wall=sent_at(beat))
    assert isinstance(answer, Answer)
    assert isinstance(v.receive(answer.frame.text, now=T0 + 11, wall=sent_at(answer.frame)), Ignore)


def test_silence_times_out_once() -> None:
    p = miner()
    assert p.next_deadline() == T0 + 10
    for t in (10, 20, 30):
        assert isinstance(p.poll(T0 + t), Frame)  # heartbeats do not keep the link alive
    assert p.next_deadline() == T0 + 35
    assert p.poll(T0 + 34.9) is None

    assert p.poll(T0 + 35) == TIMED_OUT
    assert TIMED_OUT.code == CloseCode.INTERNAL and TIMED_OUT.reason == "connection timeout"
    assert p.closing == TIMED_OUT
    assert p.poll(T0 + 36) == TIMED_OUT
    assert p.poll(T0 + 1000) == TIMED_OUT
    assert p._stats.rejections == {"connection timeout": 1}
    assert p.may_flush()


def test_a_frame_received_pushes_the_timeout_back() -> None:
    v, m = validator(), miner()
    frame = v.sign(heartbeat())
    # even a refused frame shows the peer is alive
    refused = m.receive(frame.text.encode(), now=T0 + 30, wall=sent_at(frame))
    assert isinstance(refused, Refuse)
    assert m.next_deadline() == T0 + 10
    for t in (10, 20, 30, 40, 50, 60):
        assert isinstance(m.poll(T0 + t), Frame)
    assert m.poll(T0 + 64.9) is None
    assert m.poll(T0 + 65) == TIMED_OUT


def test_a_blocked_write_is_a_slow_consumer_counted_once() -> None:
    p = validator()
    p.send_started(T0 + 1)
    assert p.next_deadline() == T0 + 6
    assert p.poll(T0 + 5.9) is None

    assert p.poll(T0 + 6) == SLOW
    assert SLOW.code == CloseCode.POLICY and int(SLOW.code) == 1008
    assert SLOW.reason == "slow consumer"
    assert SLOW.kind is RefusalKind.SLOW_CONSUMER
    assert p.poll(T0 + 7) == SLOW
    assert p.poll(T0 + 100) == SLOW
    assert p._stats.rejections == {"slow consumer": 1}
    assert not p.may_flush()


def test_a_finished_write_cancels_the_slow_consumer_deadline() -> None:
    p = validator()
    p.send_started(T0 + 1)
    frame = p.sign(heartbeat())
    p.send_finished(frame)
    assert p.next_deadline() == T0 + 10
    assert p.poll(T0 + 6) is None
    assert p.frames_out == 1 and p._stats.frames_out == {"heartbeat": 1}
    assert p.closing is None


def test_a_full_backlog_for_send_timeout_is_a_slow_consumer() -> None:
    p = validator()
    p.backlog(T0 + 1, full=True)
    p.backlog(T0 + 3, full=True)  # still full: the deadline runs from when it filled
    assert p.next_deadline() == T0 + 6
    assert p.poll(T0 + 5.9) is None
    assert p.poll(T0 + 6) == SLOW
    assert p.poll(T0 + 7) == SLOW
    assert p._stats.rejections == {"slow consumer": 1}
    assert not p.may_flush()


def test_a_drained_backlog_cancels_the_deadline() -> None:
    p = validator()
    p.backlog(T0 + 1, full=True)
    p.backlog(T0 + 4, full=False)
    assert p.next_deadline() == T0 + 10
    assert p.poll(T0 + 6) is None
    assert p.poll(T0 + 9) is None
    assert p.closing is None
    # filling again starts a new deadline
    p.backlog(T0 + 9, full=True)
    assert p.next_deadline() == T0 + 10
    assert isinstance(p.poll(T0 + 10), Frame)
    assert p.next_deadline() == T0 + 14
    assert p.poll(T0 + 14) == SLOW


def test_dropped_broadcasts_count_and_fill_the_backlog() -> None:
    p = validator()
    p.broadcast_dropped(T0 + 1)
    p.broadcast_dropped(T0 + 2)
    assert p._stats.dropped_broadcasts == 2
    assert p.next_deadline() == T0 + 6
    assert p.poll(T0 + 6) == SLOW


def test_overflow_closes_as_slow_consumer() -> None:
    p = miner()
    assert p.may_flush()
    assert p.overflowed() == SLOW
    assert p.overflowed() == SLOW
    assert p.closing == SLOW
    assert p.poll(T0) == SLOW
    assert p._stats.rejections == {"slow consumer": 1}
    assert not p.may_flush()


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(lambda p: p.poll(T0 + 35), id="timeout"),
        pytest.param(lambda p: p.overflowed(), id="overflow"),
        pytest.param(lambda p: p.close(GOING_AWAY), id="going-away"),
    ],
)
def test_the_first_close_decision_wins(first: Callable[[LinkProtocol], object]) -> None:
    p = validator()
    decision = first(p)
    assert p.closing is not None and decision == p.closing
    kept = p.closing
    counted = dict(p._stats.rejections)

    assert p.overflowed() == kept
    assert p.close(GOING_AWAY) == kept
    p.send_started(T0 + 40)
    assert p.poll(T0 + 1000) == kept
    assert p.closing == kept
    assert p._stats.rejections == counted  # later decisions are not counted either
    assert p.may_flush() is (kept != SLOW)


def test_may_flush_is_false_only_after_a_slow_consumer_close() -> None:
    for decision, flush in ((TIMED_OUT, True), (FLOODED, True), (GOING_AWAY, True), (SLOW, False)):
        p = validator()
        assert p.may_flush()
        p.close(decision)
        assert p.may_flush() is flush


def test_a_flood_after_a_timeout_does_not_change_or_count_the_close() -> None:
    settings = attrs.evolve(SETTINGS, rate_limit=1, rate_burst=1, flood_strikes=1)
    p = validator(settings=settings)
    assert p.poll(T0 + 35) == TIMED_OUT
    verdicts = [p.receive("x", now=T0 + 35, wall=0.0) for _ in range(4)]
    assert isinstance(verdicts[-1], Close)
    assert p.closing == TIMED_OUT
    assert p._stats.rejections["flooding"] == 0


# ---- sans-IO: no trio, no sockets ------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["trio"] = None
    sys.modules["trio_websocket"] = None

    import importlib
    import json
    import os
    import pkgutil
    import types

    # bettensor_ws/__init__.py imports the Trio shell: load the protocol
    # package under an empty parent instead.
    root = os.getcwd()
    parent = types.ModuleType("bettensor_ws")
    parent.__path__ = [os.path.join(root, "bettensor_ws")]
    sys.modules["bettensor_ws"] = parent

    import bettensor_ws.protocol as protocol

    names = sorted(
        m.name for m in pkgutil.iter_modules(protocol.__path__, "bettensor_ws.protocol.")
    )
    assert "bettensor_ws.protocol.link" in names, names
    for name in names:
        module = importlib.import_module(name)
        assert module.__file__.startswith(os.path.join(root, "bettensor_ws", "protocol")), module

    # ("_socket", the C module, is imported by typing_extensions for a type
    # alias; no network code can run without the "socket" module itself.)
    FORBIDDEN = {
        "trio", "trio_websocket", "wsproto", "websockets", "socket", "ssl",
        "selectors", "asyncio", "http", "urllib3", "requests", "aiohttp",
    }
    loaded = {name for name, module in sys.modules.items() if module is not None}
    bad = sorted(n for n in loaded if n.split(".")[0] in FORBIDDEN)
    assert not bad, f"the protocol package imported {bad}"
    assert sys.modules["trio"] is None and sys.modules["trio_websocket"] is None

    from bittensor_wallet import Keypair
    from bettensor_ws.protocol.link import (
        Answer, ConnectionSettings, Deliver, Ignore, LinkProtocol, Refuse, Role,
    )
    from bettensor_ws.protocol.messages import HeartbeatMessage, PredictionMessage
    from bettensor_ws.protocol.refusals import RefusalKind
    from bettensor_ws.protocol.replay import ReplayGuard, parse_timestamp
    from bettensor_ws.protocol.stats import Stats

    alice = Keypair.create_from_uri("//Alice")
    bob = Keypair.create_from_uri("//Bob")

    def side(role, key, peer, handled):
        return LinkProtocol(
            role=role, signer=key, peer_hotkey=peer.ss58_address,
            settings=ConnectionSettings(), guard=ReplayGuard(), stats=Stats(),
            now=0.0, handled=handled,
        )

    def wall(frame):
        return parse_timestamp(json.loads(frame.text)["timestamp"])

    v = side(Role.VALIDATOR, alice, bob, frozenset({"prediction"}))
    m = side(Role.MINER, bob, alice, frozenset())

    p = m.sign(PredictionMessage(sender="", data={
        "prediction_id": "p1", "game_id": "g1", "miner_uid": 7, "predicted_outcome": "Home",
        "predicted_odds": 1.8, "team_a": "A", "team_b": "B", "wager": 10.0,
    }))
    assert isinstance(v.receive(p.text, now=1.0, wall=wall(p)), Deliver)

    beat = v.sign(HeartbeatMessage(sender="", data={}))
    answer = m.receive(beat.text, now=1.0, wall=wall(beat))
    assert isinstance(answer, Answer) and answer.frame.type == "heartbeat_ack"
    assert isinstance(v.receive(answer.frame.text, now=2.0, wall=wall(answer.frame)), Ignore)

    again = v.receive(p.text, now=3.0, wall=wall(p) + 1)
    assert isinstance(again, Refuse) and again.refusal.kind is RefusalKind.REPLAYED_NONCE
    assert again.frame is not None

    assert sys.modules["trio"] is None and sys.modules["trio_websocket"] is None
    print("OK")
    """
)


def test_protocol_package_runs_without_trio() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
