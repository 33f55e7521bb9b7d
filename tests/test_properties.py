"""Hypothesis properties of the sans-IO core (issue 2, item 9).

Signing costs about 110 us per sr25519 sign or verify, so the signing
properties run 50-80 examples; the pure codec ones run more.
"""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import bettensor_ws
from bettensor_ws import (
    ConfirmationMessage,
    DecodeError,
    Dispatcher,
    ErrorMessage,
    GameUpdateMessage,
    HeartbeatAckMessage,
    HeartbeatMessage,
    PredictionMessage,
    ReplayGuard,
    WebSocketMessage,
    WelcomeMessage,
    decode,
    encode,
    sign,
    verify,
)
from bettensor_ws.testing import MockWebSocket

BUILTIN: tuple[type[WebSocketMessage], ...] = (
    PredictionMessage,
    ConfirmationMessage,
    GameUpdateMessage,
    HeartbeatMessage,
    HeartbeatAckMessage,
    WelcomeMessage,
    ErrorMessage,
)

FAST = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
SIGNING = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- JSON-safe values

text = st.text(max_size=16)  # any code point but surrogates: non-ASCII included
finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-(2.0**63), max_value=2.0**63, exclude_min=True, exclude_max=True)
number = st.integers(min_value=-(2**63), max_value=2**63 - 1) | finite
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
scalars = st.none() | st.booleans() | int64 | finite | text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(text, json_values, max_size=5)
opt = st.none().__or__

str_or_int = text | int64
maybe_float = st.none() | number


prediction_dict = st.fixed_dictionaries(
    {"prediction_id": text},
    optional={
        "game_id": opt(str_or_int),
        "miner_uid": opt(str_or_int),
        "prediction_date": opt(text),
        "predicted_outcome": opt(text),
        "predicted_odds": maybe_float,
        "team_a": opt(text),
        "team_b": opt(text),
        "wager": maybe_float,
        "team_a_odds": maybe_float,
        "team_b_odds": maybe_float,
        "tie_odds": maybe_float,
        "model_name": opt(text),
        "confidence_score": maybe_float,
        "outcome": opt(text),
        "payout": maybe_float,
    },
)


@st.composite
def prediction_data(draw: st.DrawFn) -> dict[str, Any]:
    """A single prediction (``prediction_id`` or the seed's ``id``) or a batch."""
    form = draw(st.sampled_from(["single", "seed_id", "batch"]))
    if form == "batch":
        return {"predictions": draw(st.lists(prediction_dict, min_size=1, max_size=4))}
    single = draw(prediction_dict)
    if form == "seed_id":
        single["id"] = single.pop("prediction_id")
    return single


status = st.sampled_from(["success", "error"])
confirmation_single = st.fixed_dictionaries(
    {"status": status},
    optional={
        "prediction_id": opt(text),
        "message": text,
        "timestamp": opt(text),
        "miner_stats": opt(json_objects),
    },
)
confirmation_batch = st.fixed_dictionaries(
    {
        "results": st.lists(
            st.fixed_dictionaries(
                {"prediction_id": text, "status": status}, optional={"message": text}
            ),
            min_size=1,
            max_size=4,
        ),
        "timestamp": text,
    }
)
team_game = st.fixed_dictionaries(
    {"game_id": str_or_int, "team_a": text, "team_b": text, "event_start_date": text},
    optional={
        "sport": text,
        "league": text,
        "create_date": text,
        "last_update_date": text,
        "active": st.booleans(),
        "outcome": text,
        "team_a_odds": maybe_float,
        "team_b_odds": maybe_float,
        "tie_odds": maybe_float,
        "can_tie": st.booleans(),
    },
)
game_update_data = st.fixed_dictionaries(
    {"games": st.lists(team_game, max_size=3)}, optional={"timestamp": text}
)
welcome_data = st.fixed_dictionaries(
    {},
    optional={"message": text, "status": text, "features": st.lists(text, max_size=3)},
)
error_data = st.fixed_dictionaries({"message": text}, optional={"code": int64, "detail": text})

DATA_FOR: dict[type[WebSocketMessage], st.SearchStrategy[dict[str, Any]]] = {
    PredictionMessage: prediction_data(),
    ConfirmationMessage: confirmation_single | confirmation_batch,
    GameUpdateMessage: game_update_data,
    HeartbeatMessage: json_objects,
    HeartbeatAckMessage: json_objects,
    WelcomeMessage: welcome_data,
    ErrorMessage: error_data,
}


@st.composite
def messages(draw: st.DrawFn, *, signed_fields: bool = True) -> WebSocketMessage:
    cls = draw(st.sampled_from(BUILTIN))
    data = draw(DATA_FOR[cls])
    if not signed_fields:
        return cls(sender="placeholder", data=data)
    return cls(
        sender=draw(text),
        data=data,
        timestamp=draw(text),
        nonce=draw(text),
        signature=draw(st.none() | st.text("0123456789abcdef", min_size=1, max_size=128)),
    )


def _canon(value: Any) -> str:
    """What a signature covers of ``value``."""
    return json.dumps(value, sort_keys=True)


# --------------------------------------------------------------------------- round trips


@FAST
@given(messages())
def test_round_trip_every_builtin_type(message: WebSocketMessage) -> None:
    wire = encode(message)
    decoded = decode(wire)
    assert type(decoded) is type(message)
    assert decoded == message
    assert decoded.to_dict() == message.to_dict()
    assert _canon(decoded.to_dict()) == _canon(message.to_dict())
    assert decode(wire.encode("utf-8")) == message
    # the typed view decoded off the wire is the one the original would give
    if isinstance(message, PredictionMessage):
        assert decoded.predictions == message.predictions  # type: ignore[attr-defined]
    elif isinstance(message, GameUpdateMessage):
        assert decoded.games == message.games  # type: ignore[attr-defined]
    elif isinstance(message, ConfirmationMessage):
        assert decoded.results == message.results  # type: ignore[attr-defined]


@SIGNING
@given(msg=messages(signed_fields=False))
def test_signed_round_trip_still_verifies(alice: Any, msg: WebSocketMessage) -> None:
    signed = sign(msg, alice)
    assert signed.sender == alice.ss58_address
    assert verify(signed)
    decoded = decode(encode(signed))
    assert decoded == signed
    assert type(decoded) is type(signed)
    assert verify(decoded)


# --------------------------------------------------------------------------- decode never raises anything but DecodeError


def _decode_only_decode_error(raw: str | bytes) -> WebSocketMessage | None:
    try:
        return decode(raw)
    except DecodeError as exc:
        assert str(exc), "a DecodeError must say why"
        return None


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_decode_error(raw: bytes) -> None:
    _decode_only_decode_error(raw)


@settings(deadline=None, max_examples=200)
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=100))
def test_arbitrary_text_raise_only_decode_error(raw: str) -> None:
    # includes lone surrogates, which cannot even be encoded as UTF-8
    _decode_only_decode_error(raw)


any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(deadline=None, max_examples=300)
@given(any_json)
def test_arbitrary_json_raises_only_decode_error(value: Any) -> None:
    # stdlib json: NaN/Infinity and integers of any size reach the decoder too
    _decode_only_decode_error(json.dumps(value))


@settings(deadline=None, max_examples=50)
@given(st.integers(min_value=1, max_value=3000), st.sampled_from(["[", '{"a":']))
def test_deep_nesting_raises_decode_error(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    raw = opener * depth + "1" + closer * depth
    _decode_only_decode_error(raw)
    # and inside an otherwise valid envelope
    head = '{"type":"heartbeat","sender":"s","timestamp":"t","nonce":"n","data":{"x":'
    env = head + raw + "}}"
    _decode_only_decode_error(env)


def _payload_shaped(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={k: any_json for k in keys})


ENVELOPE_KEYS = ("type", "sender", "data", "timestamp", "nonce", "signature")
REQUIRED = ("type", "sender", "data", "timestamp", "nonce")
random_data = st.one_of(
    any_json,
    _payload_shaped([f.name for f in attrs.fields(bettensor_ws.TeamGamePrediction)] + ["id"]),
    st.fixed_dictionaries({"predictions": st.lists(any_json | prediction_dict, max_size=3)}),
    _payload_shaped([f.name for f in attrs.fields(bettensor_ws.Confirmation)] + ["results"]),
    st.fixed_dictionaries({"results": st.lists(any_json, max_size=3)}),
    st.fixed_dictionaries({"games": any_json | st.lists(any_json | team_game, max_size=3)}),
    _payload_shaped(["message", "features", "status"]),
)


def _mostly(valid: st.SearchStrategy[Any], garbage: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` about four times in five, so that most envelopes get past the shape checks."""
    return st.integers(0, 4).flatmap(lambda n: garbage if n == 0 else valid)


@st.composite
def envelope_like(draw: st.DrawFn) -> dict[str, Any]:
    """Envelopes whose fields have random types; payloads shaped like the real ones."""
    env: dict[str, Any] = {
        "type": draw(
            _mostly(st.sampled_from([c.MESSAGE_TYPE for c in BUILTIN]), st.text(max_size=8) | any_json)
        ),
        "sender": draw(_mostly(st.text(max_size=8), any_json)),
        "data": draw(random_data),
        "timestamp": draw(_mostly(st.text(max_size=8), any_json)),
        "nonce": draw(_mostly(st.text(max_size=8), any_json)),
        "signature": draw(_mostly(st.none() | st.text(max_size=8), any_json)),
    }
    if draw(st.integers(0, 4)) == 0:
        for key in draw(st.lists(st.sampled_from(ENVELOPE_KEYS), unique=True, min_size=1, max_size=2)):
            del env[key]
    if draw(st.integers(0, 4)) == 0:
        env.update(draw(st.dictionaries(st.text(max_size=8), any_json, min_size=1, max_size=1)))
    return env


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(envelope_like())
def test_envelope_like_dicts_raise_only_decode_error(env: dict[str, Any]) -> None:
    message = _decode_only_decode_error(json.dumps(env))
    event("accepted" if message is not None else "rejected")
    if message is None:
        return
    # what is accepted is exactly a well-formed envelope
    assert set(REQUIRED) <= env.keys() <= set(ENVELOPE_KEYS)
    assert all(isinstance(env[k], str) for k in ("type", "sender", "timestamp", "nonce"))
    assert isinstance(env["data"], dict)
    assert env.get("signature") is None or isinstance(env["signature"], str)
    assert message.type == env["type"]
    assert message.to_dict() == {**env, "signature": env.get("signature")}


# --------------------------------------------------------------------------- tampering


@SIGNING
@given(msg=messages(signed_fields=False), data=st.data())
def test_changing_any_field_breaks_the_signature(
    alice: Any, bob: Any, msg: WebSocketMessage, data: st.DataObject
) -> None:
    signed = sign(msg, alice)
    assert verify(signed)
    original = signed.to_dict()

    tampered: list[tuple[str, WebSocketMessage]] = []
    tampered.append(("sender", attrs.evolve(signed, sender=bob.ss58_address)))

    timestamp = data.draw(text.filter(lambda t: t != signed.timestamp), label="timestamp")
    tampered.append(("timestamp", attrs.evolve(signed, timestamp=timestamp)))

    nonce = data.draw(text.filter(lambda n: n != signed.nonce), label="nonce")
    tampered.append(("nonce", attrs.evolve(signed, nonce=nonce)))

    other_cls = data.draw(st.sampled_from([c for c in BUILTIN if c is not type(signed)]), label="type")
    tampered.append(
        (
            "type",
            other_cls(
                sender=signed.sender,
                data=signed.data,
                timestamp=signed.timestamp,
                nonce=signed.nonce,
                signature=signed.signature,
            ),
        )
    )

    sig = bytearray(bytes.fromhex(signed.signature or ""))
    index = data.draw(st.integers(0, len(sig) - 1), label="sig byte")
    sig[index] ^= data.draw(st.integers(1, 255), label="xor")
    tampered.append(("signature", attrs.evolve(signed, signature=sig.hex())))

    # data: a new key, a renamed key, a removed key, a changed value
    new_key = data.draw(text.filter(lambda k: k not in signed.data), label="new key")
    tampered.append(("data+key", attrs.evolve(signed, data={**signed.data, new_key: None})))
    if signed.data:
        key = data.draw(st.sampled_from(sorted(signed.data)), label="key")
        rest = {k: v for k, v in signed.data.items() if k != key}
        tampered.append(("data-key", attrs.evolve(signed, data=rest)))
        tampered.append(("data:rename", attrs.evolve(signed, data={**rest, new_key: signed.data[key]})))
        new_value = data.draw(
            (scalars | json_objects).filter(lambda v: _canon(v) != _canon(signed.data[key])),
            label="value",
        )
        tampered.append(("data:value", attrs.evolve(signed, data={**signed.data, key: new_value})))

    for what, message in tampered:
        assert not verify(message), f"changing {what} kept the signature valid"
        # and the same holds once the tampered message has crossed the wire
        received = _decoded(encode(message))
        assert received is None or not verify(received), what
    assert signed.to_dict() == original, "tampering must not have mutated the signed message"
    assert verify(signed)


def _decoded(wire: str) -> WebSocketMessage | None:
    """The message, or None when the tampered payload no longer even decodes."""
    try:
        return decode(wire)
    except DecodeError:
        return None


# --------------------------------------------------------------------------- replay guard


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


T0 = 1_750_000_000.0

replay_ops = st.lists(
    st.tuples(
        st.sampled_from(["alice", "bob", "carol"]),
        st.sampled_from(["n1", "n2", "n3", "n4"]),
        # timestamp offset from now: inside, at the edge of and outside a 300 s window
        st.one_of(st.floats(-450, 450), st.sampled_from([-300.0, 300.0, 0.0, -299.999999, 300.000001])),
        st.one_of(st.floats(0, 400), st.just(0.0), st.sampled_from([1e-6, 300.0])),
        st.booleans(),  # resend an earlier accepted timestamp (an exact replay)
    ),
    max_size=60,
)


@settings(deadline=None, max_examples=300)
@given(replay_ops, st.sampled_from([300.0, 10.0, 0.5]))
def test_replay_guard_never_accepts_a_pair_twice_within_the_window(
    ops: list[tuple[str, str, float, float, bool]], window: float
) -> None:
    guard = ReplayGuard(window=window)
    now = T0
    accepted: list[tuple[str, str, str, float]] = []  # sender, nonce, timestamp, sent_at
    for sender, nonce, offset, advance, exact_replay in ops:
        now += advance
        earlier = [a for a in accepted if a[:2] == (sender, nonce)]
        if exact_replay and earlier:
            timestamp = earlier[-1][2]
        else:
            timestamp = _iso(now + offset * window / 300.0)
        sent_at = _epoch(timestamp)
        reason = guard.check(sender, nonce, timestamp, now=now, mono=now)
        event(f"outcome: {reason.key if reason else 'accepted'}")
        if reason is None:
            # safety: an exact replay is never accepted, and neither is a pair
            # whose earlier acceptance is still inside the window
            assert not any(a[2] == timestamp for a in earlier), "exact replay accepted"
            assert not any(a[3] + window >= now for a in earlier), "pair accepted twice in window"
            assert now - window <= sent_at <= now + window
            accepted.append((sender, nonce, timestamp, sent_at))
        else:
            # liveness, away from the edges: a fresh pair with a timestamp well
            # inside the window is accepted
            # (entries are forgotten a second of timestamps at a time: up to 1 s late)
            fresh = not any(a[3] + window + 1.0 >= now - 1e-3 for a in earlier)
            inside = now - window + 1e-3 < sent_at < now + window - 1e-3
            assert not (fresh and inside), f"refused a fresh pair: {reason}"


@settings(deadline=None, max_examples=15)
@given(
    rate=st.floats(0.5, 20.0),
    window=st.floats(1.0, 60.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_replay_guard_memory_stays_bounded(rate: float, window: float, seed: int) -> None:
    rnd = random.Random(seed)  # a long stream; hypothesis picks rate, window and seed
    guard = ReplayGuard(window=window)
    bound = rate * (window + 1) + 2  # entries go a second of timestamps at a time: up to 1 s late
    steps = max(500, int(4 * rate * window))
    now = T0
    peak = 0
    for i in range(steps):
        now += (1.0 / rate) * (1.0 + rnd.random())  # at most `rate` messages a second
        delay = rnd.uniform(0.0, min(2.0, window / 2))  # sent a little before it arrives
        sender = f"miner{rnd.randrange(8)}"
        assert guard.check(sender, f"nonce-{i}", _iso(now - delay), now=now, mono=now) is None
        peak = max(peak, len(guard))
        assert len(guard) <= bound, (len(guard), bound)
    # and it is not trivially empty: it holds about a window's worth
    assert peak >= min(steps, math.floor(rate * window / 2 * 0.5))


# --------------------------------------------------------------------------- idempotent dispatch


def _prediction(pid: str, wager: float) -> PredictionMessage:
    return PredictionMessage(
        sender="5miner",
        data={"prediction_id": pid, "game_id": "g", "wager": wager, "predicted_outcome": "A"},
    )


@settings(deadline=None, max_examples=100)
@given(
    pool=st.dictionaries(text, finite, min_size=1, max_size=6),
    picks=st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=20),
)
async def test_dispatching_twice_equals_dispatching_once(
    pool: dict[str, float], picks: list[int]
) -> None:
    distinct = [_prediction(pid, wager) for pid, wager in pool.items()]
    sequence = [distinct[i % len(distinct)] for i in picks]  # with duplicates
    once: list[PredictionMessage] = []
    for message in sequence:
        if message not in once:
            once.append(message)

    async def run(messages: list[PredictionMessage]) -> tuple[dict[str, Any], list[Any]]:
        store: dict[str, dict[str, Any]] = {}

        async def handler(websocket: Any, message: WebSocketMessage) -> None:
            assert isinstance(message, PredictionMessage)
            for p in message.predictions:
                store[p.prediction_id] = {"wager": p.wager, "sender": message.sender}
            await websocket.send_json(
                {"type": "confirmation", "prediction_id": message.prediction.prediction_id, "status": "success"}
            )

        dispatcher = Dispatcher()
        dispatcher.register_handler("prediction", handler)
        ws = MockWebSocket()
        for message in messages:
            # what a connection hands the dispatcher: a message off the wire
            assert await dispatcher.dispatch(ws, decode(encode(message)))
        return store, [m.data["prediction_id"] for m in ws.sent]

    state_seq, replies_seq = await run(sequence)
    state_once, replies_once = await run(once)
    assert state_seq == state_once
    assert set(replies_seq) == set(replies_once)
    assert len(replies_seq) == len(sequence)
    # the same message twice in a row is the same as once
    state_twice, _ = await run([distinct[0], distinct[0]])
    state_single, _ = await run([distinct[0]])
    assert state_twice == state_single


@pytest.mark.parametrize("cls", BUILTIN, ids=lambda c: c.MESSAGE_TYPE)
def test_strategies_cover_every_builtin_type(cls: type[WebSocketMessage]) -> None:
    assert bettensor_ws.message_types()[cls.MESSAGE_TYPE] is cls
    assert cls in DATA_FOR
