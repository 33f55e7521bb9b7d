"""The core against an independent implementation of the wire format.

``refpeer`` signs and verifies with stdlib ``json`` and never imports
``bettensor_ws``: what it signs must decode and verify here, and what is signed
and encoded here must verify there, for envelopes and for auth frames.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bettensor_ws.protocol.signing
from bettensor_ws import (
    AuthError,
    ConfirmationMessage,
    DecodeError,
    ErrorMessage,
    GameUpdateMessage,
    HeartbeatAckMessage,
    HeartbeatMessage,
    PredictionMessage,
    ReplayGuard,
    WebSocketMessage,
    WelcomeMessage,
    build_auth,
    check_auth,
    decode,
    encode,
    sign,
    verify,
)

from . import refpeer

PREDICTION = {
    "prediction_id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
    "game_id": "epl-2025-ars-tot",
    "miner_uid": 42,
    "prediction_date": "2025-06-01T12:00:00+00:00",
    "predicted_outcome": "Arsenal",
    "predicted_odds": 1.85,
    "team_a": "Arsenal",
    "team_b": "Tottenham Hotspur",
    "wager": 12.5,
    "team_a_odds": 1.85,
    "team_b_odds": 4.2,
    "tie_odds": 3.6,
    "model_name": "élo-v2 ⚽",
    "confidence_score": 0.7312345678901234,
    "outcome": "Unfinished",
    "payout": 0.0,
}
GAME = {
    "game_id": 9001,
    "team_a": "São Paulo",
    "team_b": "Grêmio",
    "sport": "soccer",
    "league": "Brasileirão",
    "create_date": "2025-06-01T00:00:00+00:00",
    "last_update_date": "2025-06-01T00:00:00+00:00",
    "event_start_date": "2025-06-02T19:00:00+00:00",
    "active": True,
    "outcome": "Unfinished",
    "team_a_odds": 2.1,
    "team_b_odds": 3.35,
    "tie_odds": 3.1,
    "can_tie": True,
}

# (wire type, data, class it must decode to)
CASES: list[tuple[str, dict[str, Any], type[WebSocketMessage]]] = [
    ("prediction", PREDICTION, PredictionMessage),
    ("prediction", {"id": "seed-style-id", "wager": 3, "predicted_outcome": "北京"}, PredictionMessage),
    ("prediction", {"predictions": [PREDICTION, {**PREDICTION, "prediction_id": "p2"}]}, PredictionMessage),
    (
        "confirmation",
        {
            "prediction_id": PREDICTION["prediction_id"],
            "status": "success",
            "message": "Prédiction reçue ✓",
            "timestamp": "2025-06-01T12:00:01.123456+00:00",
            "miner_stats": {"total": 10, "accuracy": 0.6, "streak": -1e-7},
        },
        ConfirmationMessage,
    ),
    ("confirmation", {"status": "error", "message": "Invalid prediction format"}, ConfirmationMessage),
    (
        "confirmation",
        {
            "results": [{"prediction_id": "p1", "status": "success", "message": ""}],
            "timestamp": "2025-06-01T12:00:01+00:00",
        },
        ConfirmationMessage,
    ),
    ("game_update", {"games": [GAME], "timestamp": "2025-06-01T12:00:00+00:00"}, GameUpdateMessage),
    ("heartbeat", {}, HeartbeatMessage),
    ("heartbeat_ack", {"timestamp": "2025-06-01T12:00:00+00:00", "rtt": 0.000123}, HeartbeatAckMessage),
    ("welcome", {"message": "Connection established", "status": "success", "features": ["batch"]}, WelcomeMessage),
    ("error", {"message": "Ungültige Nachricht — 无效 \u0000 \"quoted\" \\ 😀"}, ErrorMessage),
]
IDS = [f"{t}-{i}" for i, (t, _, _) in enumerate(CASES)]


# --------------------------------------------------------------------------- reference -> ours


@pytest.mark.parametrize(("type_", "data", "cls"), CASES, ids=IDS)
def test_reference_signed_envelope_decodes_and_verifies(
    alice: Any, type_: str, data: dict[str, Any], cls: type[WebSocketMessage]
) -> None:
    env = refpeer.sign_envelope(alice, type_, data)
    assert refpeer.verify_envelope(env)
    for wire in (json.dumps(env), json.dumps(env, ensure_ascii=False).encode("utf-8")):
        message = decode(wire)
        assert type(message) is cls
        assert message.sender == alice.ss58_address
        assert message.data == data
        assert message.nonce == env["nonce"] and message.timestamp == env["timestamp"]
        assert verify(message)


def test_reference_typed_views(alice: Any) -> None:
    prediction = decode(json.dumps(refpeer.sign_envelope(alice, "prediction", PREDICTION)))
    assert isinstance(prediction, PredictionMessage)
    assert prediction.prediction.prediction_id == PREDICTION["prediction_id"]
    assert prediction.prediction.confidence_score == PREDICTION["confidence_score"]
    assert prediction.prediction.model_name == "élo-v2 ⚽"
    update = decode(json.dumps(refpeer.sign_envelope(alice, "game_update", {"games": [GAME]})))
    assert isinstance(update, GameUpdateMessage)
    assert update.games[0].team_a == "São Paulo" and update.games[0].game_id == 9001


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: e["data"].__setitem__("wager", 13.5),
        lambda e: e.__setitem__("timestamp", e["timestamp"].replace("+00:00", "Z")),
        lambda e: e.__setitem__("nonce", e["nonce"] + "0"),
        lambda e: e.__setitem__("type", "heartbeat"),
        lambda e: e.__setitem__("signature", ("1" if e["signature"][0] == "0" else "0") + e["signature"][1:]),
    ],
    ids=["data", "timestamp", "nonce", "type", "signature"],
)
def test_tampered_reference_envelope_fails_here(alice: Any, tamper: Any) -> None:
    env = refpeer.sign_envelope(alice, "prediction", dict(PREDICTION))
    tamper(env)
    assert not refpeer.verify_envelope(env)
    message = decode(json.dumps(env))
    assert not verify(message)


def test_reference_envelope_from_another_sender_fails_here(alice: Any, bob: Any) -> None:
    env = refpeer.sign_envelope(alice, "heartbeat", {})
    env["sender"] = bob.ss58_address
    assert not verify(decode(json.dumps(env)))


# --------------------------------------------------------------------------- ours -> reference


@pytest.mark.parametrize(("type_", "data", "cls"), CASES, ids=IDS)
def test_our_signed_envelope_verifies_on_the_reference(
    alice: Any, type_: str, data: dict[str, Any], cls: type[WebSocketMessage]
) -> None:
    signed = sign(cls(sender="placeholder", data=data), alice)
    env = json.loads(encode(signed))
    assert set(env) == set(refpeer.ENVELOPE_KEYS)
    assert env["type"] == type_
    assert env["sender"] == alice.ss58_address
    assert env["signature"] == env["signature"].lower() and not env["signature"].startswith("0x")
    assert refpeer.verify_envelope(env)
    # the text we sign is the reference's text
    assert refpeer.signing_text(env) == bettensor_ws.protocol.signing.signed_text(
        {k: v for k, v in env.items() if k != "signature"}
    )


def test_our_envelope_tampered_fails_on_the_reference(alice: Any, bob: Any) -> None:
    signed = sign(PredictionMessage(sender="x", data=dict(PREDICTION)), alice)
    good = json.loads(encode(signed))
    assert refpeer.verify_envelope(good)
    for key, value in [
        ("sender", bob.ss58_address),
        ("nonce", good["nonce"] + "x"),
        ("timestamp", "2025-01-01T00:00:00+00:00"),
        ("type", "confirmation"),
        ("data", {**good["data"], "wager": 0.0}),
        ("signature", good["signature"][::-1]),
    ]:
        assert not refpeer.verify_envelope({**good, key: value}), key


def test_seed_style_reply_verifies_on_the_reference(alice: Any) -> None:
    """A seed-style flat dict, made a message the way ``send_json`` does, then signed."""
    from bettensor_ws.protocol.replies import to_message

    reply = to_message({"type": "confirmation", "status": "error", "message": "Missing data"}, "x")
    env = json.loads(encode(sign(reply, alice)))
    assert env["data"] == {"status": "error", "message": "Missing data"}
    assert refpeer.verify_envelope(env)


# --------------------------------------------------------------------------- property: both directions, any JSON data

int64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what both sides carry exactly
finite_in_range = st.floats(  # larger magnitudes are refused: orjson cannot carry them exactly
    allow_nan=False, allow_infinity=False, min_value=-(2.0**63), max_value=2.0**63,
    exclude_min=True, exclude_max=True,
)
json_data = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        st.none() | st.booleans() | int64 | finite_in_range | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=10,
    ),
    max_size=5,
)


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow])
@given(data=json_data, ensure_ascii=st.booleans())
def test_any_json_data_interoperates_both_ways(
    alice: Any, data: dict[str, Any], ensure_ascii: bool
) -> None:
    env = refpeer.sign_envelope(alice, "heartbeat", data)
    message = decode(json.dumps(env, ensure_ascii=ensure_ascii))
    assert verify(message)
    back = json.loads(encode(sign(HeartbeatMessage(sender="x", data=data), alice)))
    assert refpeer.verify_envelope(back)


@pytest.mark.parametrize("big", [2**64, -(2**63) - 1, 10**30], ids=["2**64", "-2**63-1", "10**30"])
def test_reference_integer_beyond_64_bits_is_kept_or_refused(alice: Any, big: int) -> None:
    env = refpeer.sign_envelope(alice, "heartbeat", {"n": big})
    assert refpeer.verify_envelope(env)
    try:
        message = decode(json.dumps(env))
    except DecodeError:
        return  # refusing it is fine: it is not read differently
    assert message.data == {"n": big} and type(message.data["n"]) is int
    assert verify(message)


# --------------------------------------------------------------------------- auth frames


def test_our_auth_frame_verifies_on_the_reference(alice: Any) -> None:
    frame = build_auth(alice, features=["batch"])
    wire = json.loads(json.dumps(frame))
    assert {"hotkey", "timestamp", "nonce", "signature"} <= wire.keys()
    assert wire["hotkey"] == alice.ss58_address
    assert wire["features"] == ["batch"]
    assert refpeer.verify_auth(wire)


def test_reference_auth_frame_passes_check_auth(alice: Any) -> None:
    frame = refpeer.make_auth(alice, extra={"features": ["batch"]})
    info = check_auth(json.loads(json.dumps(frame)))
    assert info.hotkey == alice.ss58_address
    assert info.nonce == frame["nonce"] and info.timestamp == frame["timestamp"]
    assert info.features == frozenset({"batch"})


def test_reference_auth_frame_with_guard_and_allow_list(alice: Any, bob: Any) -> None:
    guard = ReplayGuard()
    frame = refpeer.make_auth(alice)
    info = check_auth(frame, guard=guard, allowed={alice.ss58_address}.__contains__)
    assert info.features == frozenset()
    with pytest.raises(AuthError):  # the same frame again is a replay
        check_auth(frame, guard=guard, allowed={alice.ss58_address}.__contains__)
    with pytest.raises(AuthError):
        check_auth(refpeer.make_auth(bob), guard=guard, allowed={alice.ss58_address}.__contains__)


def test_tampered_auth_fails_on_both_sides(alice: Any, bob: Any) -> None:
    ours = build_auth(alice, features=["batch"])
    theirs = refpeer.make_auth(alice, extra={"features": ["batch"]})
    for frame in (ours, theirs):
        assert refpeer.verify_auth(frame)
        check_auth(frame)
        for key, value in [
            ("features", ["batch", "admin"]),
            ("hotkey", bob.ss58_address),
            ("nonce", frame["nonce"] + "1"),
            ("timestamp", refpeer.now_iso()),
            ("signature", "00" * 64),
        ]:
            bad = {**frame, key: value}
            assert not refpeer.verify_auth(bad), key
            with pytest.raises(AuthError):
                check_auth(bad)


def test_stale_reference_auth_is_refused(alice: Any) -> None:
    frame = refpeer.make_auth(alice, timestamp="2020-01-01T00:00:00+00:00")
    assert refpeer.verify_auth(frame)  # signed fine, but old
    with pytest.raises(AuthError, match="stale"):
        check_auth(frame, now=time.time())
