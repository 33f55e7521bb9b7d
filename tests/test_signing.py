"""sr25519 signing in the reference's wire format, and the auth frame."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
from bittensor_wallet import Keypair

from bettensor_ws import (
    AuthError,
    AuthInfo,
    HeartbeatMessage,
    PredictionMessage,
    ReplayGuard,
    WebSocketMessage,
    build_auth,
    check_auth,
    decode,
    encode,
    sign,
    verify,
)
from bettensor_ws.protocol import messages as messages_module

ENVELOPE_KEYS = {"type", "sender", "data", "timestamp", "nonce", "signature"}
AUTH_KEYS = {"hotkey", "timestamp", "nonce", "signature"}


def prediction() -> PredictionMessage:
    return PredictionMessage(
        sender="placeholder",
        data={
            "prediction_id": "p1",
            "game_id": 42,
            "predicted_odds": 2,
            "wager": 5.5,
            "note": "caf\u00e9 \u2603",
        },
    )


def reference_text(envelope: dict[str, Any]) -> str:
    """The signed text, written from the spec with the standard library only."""
    return json.dumps({k: v for k, v in envelope.items() if k != "signature"}, sort_keys=True)


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


# --------------------------------------------------------------------------- sign / verify


def test_sign_sets_sender_fresh_timestamp_nonce_and_verifies(alice: Keypair) -> None:
    original = prediction()
    original.timestamp = "2000-01-01T00:00:00+00:00"
    original.nonce = "old-nonce"
    signed = sign(original, alice)
    assert signed.sender == alice.ss58_address
    assert signed.nonce != "old-nonce" and signed.nonce
    stamp = datetime.fromisoformat(signed.timestamp)
    assert abs((stamp - datetime.now(UTC)).total_seconds()) < 5
    assert type(signed) is PredictionMessage
    assert signed.data == original.data
    assert verify(signed)


def test_sign_returns_a_copy(alice: Keypair) -> None:
    original = prediction()
    before = attrs.asdict(original)
    signed = sign(original, alice)
    assert signed is not original
    assert attrs.asdict(original) == before
    assert original.signature is None


def test_each_signing_uses_a_fresh_nonce(alice: Keypair) -> None:
    message = prediction()
    first, second = sign(message, alice), sign(message, alice)
    assert first.nonce != second.nonce
    assert first.signature != second.signature
    assert verify(first) and verify(second)


def test_signature_is_lowercase_hex_without_prefix(alice: Keypair) -> None:
    signed = sign(prediction(), alice)
    assert signed.signature is not None
    assert re.fullmatch(r"[0-9a-f]{128}", signed.signature)


def test_signed_text_is_stdlib_json_sorted_keys(alice: Keypair) -> None:
    signed = sign(prediction(), alice)
    envelope = signed.to_dict()
    assert set(envelope) == ENVELOPE_KEYS
    assert signed.signature is not None
    signature = bytes.fromhex(signed.signature)
    text = reference_text(envelope)
    assert "\\u00e9" in text  # ensure_ascii
    assert '", "' in text and '": ' in text  # default separators
    assert Keypair(ss58_address=alice.ss58_address).verify(text, signature)
    # any other rendering of the same envelope is a different text
    compact = json.dumps(
        {k: v for k, v in envelope.items() if k != "signature"},
        sort_keys=True,
        separators=(",", ":"),
    )
    unescaped = json.dumps(
        {k: v for k, v in envelope.items() if k != "signature"}, sort_keys=True, ensure_ascii=False
    )
    assert not alice.verify(compact, signature)
    assert not alice.verify(unescaped, signature)


def test_message_signed_by_hand_verifies(alice: Keypair) -> None:
    envelope: dict[str, Any] = {
        "type": "prediction",
        "sender": alice.ss58_address,
        "data": {"id": "seed-1", "wager": 2, "team_a": "Lions \u00e9"},
        "timestamp": datetime.now(UTC).isoformat(),
        "nonce": uuid.uuid4().hex,
    }
    envelope["signature"] = alice.sign(reference_text(envelope)).hex()
    message = decode(json.dumps(envelope))
    assert isinstance(message, PredictionMessage)
    assert verify(message)
    # and the same frame written compactly by another JSON library still verifies
    assert verify(decode(json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)))


def test_our_signature_verifies_by_hand_after_the_wire(alice: Keypair) -> None:
    wire = json.loads(encode(sign(prediction(), alice)))
    assert set(wire) == ENVELOPE_KEYS
    assert Keypair(ss58_address=wire["sender"]).verify(
        reference_text(wire), bytes.fromhex(wire["signature"])
    )


def test_unsigned_message_does_not_verify() -> None:
    assert not verify(prediction())
    message = prediction()
    message.signature = ""
    assert not verify(message)


def _tamper_type(m: WebSocketMessage) -> WebSocketMessage:
    return HeartbeatMessage(m.sender, m.data, m.timestamp, m.nonce, m.signature)


def _tamper_sender(m: WebSocketMessage, other: str) -> WebSocketMessage:
    m.sender = other
    return m


def _tamper_data_value(m: WebSocketMessage) -> WebSocketMessage:
    m.data = {**m.data, "wager": 5.6}
    return m


def _tamper_data_key(m: WebSocketMessage) -> WebSocketMessage:
    m.data = {**m.data, "extra": None}
    return m


def _tamper_data_int_to_float(m: WebSocketMessage) -> WebSocketMessage:
    m.data = {**m.data, "predicted_odds": 2.0}
    return m


def _tamper_timestamp(m: WebSocketMessage) -> WebSocketMessage:
    m.timestamp = (datetime.fromisoformat(m.timestamp) + timedelta(seconds=1)).isoformat()
    return m


def _tamper_nonce(m: WebSocketMessage) -> WebSocketMessage:
    m.nonce = m.nonce + "0"
    return m


def _tamper_signature(m: WebSocketMessage) -> WebSocketMessage:
    assert m.signature is not None
    flipped = "0" if m.signature[10] != "0" else "1"
    m.signature = m.signature[:10] + flipped + m.signature[11:]
    return m


@pytest.mark.parametrize(
    "tamper",
    [
        _tamper_type,
        "sender",
        _tamper_data_value,
        _tamper_data_key,
        _tamper_data_int_to_float,
        _tamper_timestamp,
        _tamper_nonce,
        _tamper_signature,
    ],
    ids=[
        "type",
        "sender",
        "data-value",
        "data-key",
        "data-int-float",
        "timestamp",
        "nonce",
        "signature",
    ],
)
def test_tampering_any_field_breaks_verify(alice: Keypair, bob: Keypair, tamper: Any) -> None:
    signed = sign(prediction(), alice)
    assert verify(signed)
    if tamper == "sender":
        tampered = _tamper_sender(signed, bob.ss58_address)
    else:
        tampered = tamper(signed)
    assert not verify(tampered)
    # and also once it has crossed the wire
    assert not verify(decode(encode(tampered)))


def test_signature_of_another_key_does_not_verify(alice: Keypair, bob: Keypair) -> None:
    by_bob = sign(prediction(), bob)
    by_bob.sender = alice.ss58_address
    assert not verify(by_bob)


@pytest.mark.parametrize(
    "signature",
    ["zz", "ab", "ab" * 63, "ab" * 65, "0x" + "ab" * 64, "ab" * 64, "\u00e9" * 128],
)
def test_garbage_signature_is_false(alice: Keypair, signature: str) -> None:
    message = sign(prediction(), alice)
    message.signature = signature
    assert verify(message) is False


@pytest.mark.parametrize("sender", ["", "not-an-address", "5" * 48, "validator_hotkey"])
def test_garbage_sender_is_false(alice: Keypair, sender: str) -> None:
    message = sign(prediction(), alice)
    message.sender = sender
    assert verify(message) is False


def test_seed_custom_message_keeps_its_attributes_when_signed(alice: Keypair) -> None:
    saved = dict(messages_module._REGISTRY)
    try:

        class PriorityMessage(WebSocketMessage):
            MESSAGE_TYPE = "priority_sign_test"

            def __init__(self, sender: str, data: dict[str, Any]) -> None:
                super().__init__(sender, data)
                self.priority = data.get("priority", "normal")

        signed = sign(PriorityMessage("x", {"priority": "high"}), alice)
        assert isinstance(signed, PriorityMessage)
        assert signed.priority == "high"
        assert verify(signed)
        decoded = decode(encode(signed))
        assert isinstance(decoded, PriorityMessage)
        assert decoded.priority == "high"
        assert verify(decoded)
    finally:
        messages_module._REGISTRY.clear()
        messages_module._REGISTRY.update(saved)


def test_heartbeat_with_empty_data_signs(alice: Keypair) -> None:
    assert verify(decode(encode(sign(HeartbeatMessage(sender="", data={}), alice))))


# --------------------------------------------------------------------------- auth frame


def auth_reason(frame: Any, **kwargs: Any) -> str:
    with pytest.raises(AuthError) as info:
        check_auth(frame, **kwargs)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == info.value.reason
    return info.value.reason


def test_auth_happy_path(alice: Keypair) -> None:
    frame = build_auth(alice)
    assert set(frame) == AUTH_KEYS
    assert frame["hotkey"] == alice.ss58_address
    assert re.fullmatch(r"[0-9a-f]{128}", frame["signature"])
    info = check_auth(frame)
    assert isinstance(info, AuthInfo)
    assert info.hotkey == alice.ss58_address
    assert info.nonce == frame["nonce"]
    assert info.timestamp == frame["timestamp"]
    assert info.features == frozenset()


def test_auth_frame_survives_json(alice: Keypair) -> None:
    frame = json.loads(json.dumps(build_auth(alice)))
    assert check_auth(frame).hotkey == alice.ss58_address


def test_auth_frame_is_signed_like_an_envelope(alice: Keypair) -> None:
    frame = build_auth(alice)
    assert alice.verify(reference_text(frame), bytes.fromhex(frame["signature"]))


def test_auth_with_features(alice: Keypair) -> None:
    frame = build_auth(alice, features=["stats", "batch"])
    assert frame["features"] == ["batch", "stats"]
    assert alice.verify(reference_text(frame), bytes.fromhex(frame["signature"]))
    assert check_auth(frame).features == frozenset({"batch", "stats"})


def test_auth_features_are_covered_by_the_signature(alice: Keypair) -> None:
    frame = build_auth(alice, features=["batch"])
    frame["features"] = ["batch", "admin"]
    assert auth_reason(frame) == "bad signature"


def test_auth_built_by_hand_is_accepted(alice: Keypair) -> None:
    frame: dict[str, Any] = {
        "hotkey": alice.ss58_address,
        "timestamp": datetime.now(UTC).isoformat(),
        "nonce": uuid.uuid4().hex,
    }
    frame["signature"] = alice.sign(reference_text(frame)).hex()
    assert check_auth(frame).hotkey == alice.ss58_address


@pytest.mark.parametrize(
    "frame",
    [
        None,
        "auth",
        [],
        {},
        {"hotkey": "h", "timestamp": "t", "nonce": "n"},
        {"hotkey": 5, "timestamp": "t", "nonce": "n", "signature": "s"},
    ],
)
def test_auth_malformed(frame: Any) -> None:
    assert auth_reason(frame).startswith("malformed auth frame")


def test_auth_malformed_timestamp(alice: Keypair) -> None:
    frame = build_auth(alice, timestamp="yesterday")
    assert auth_reason(frame).startswith("malformed auth frame")


def test_auth_missing_key_is_malformed(alice: Keypair) -> None:
    frame = build_auth(alice)
    del frame["nonce"]
    assert auth_reason(frame).startswith("malformed auth frame")


def test_auth_bad_signature(alice: Keypair, bob: Keypair) -> None:
    frame = build_auth(alice)
    frame["nonce"] = frame["nonce"] + "x"
    assert auth_reason(frame) == "bad signature"
    by_bob = build_auth(bob)
    by_bob["hotkey"] = alice.ss58_address
    assert auth_reason(by_bob) == "bad signature"
    garbage = build_auth(alice)
    garbage["signature"] = "nothex"
    assert auth_reason(garbage) == "bad signature"


def test_auth_stale(alice: Keypair) -> None:
    now = time.time()
    frame = build_auth(alice, timestamp=iso(now - 301))
    assert auth_reason(frame, now=now).startswith("stale timestamp")
    assert check_auth(build_auth(alice, timestamp=iso(now - 299)), now=now)


def test_auth_future(alice: Keypair) -> None:
    now = time.time()
    frame = build_auth(alice, timestamp=iso(now + 301))
    assert auth_reason(frame, now=now).startswith("future timestamp")


def test_auth_window_is_configurable(alice: Keypair) -> None:
    now = time.time()
    frame = build_auth(alice, timestamp=iso(now - 60))
    assert auth_reason(frame, now=now, window=30).startswith("stale timestamp")
    assert auth_reason(frame, now=now, guard=ReplayGuard(window=30)).startswith("stale timestamp")
    assert check_auth(frame, now=now, window=120).hotkey == alice.ss58_address


def test_auth_replayed_nonce(alice: Keypair) -> None:
    guard = ReplayGuard()
    frame = build_auth(alice)
    assert check_auth(frame, guard=guard).hotkey == alice.ss58_address
    assert auth_reason(frame, guard=guard) == "replayed nonce"


def test_forged_auth_does_not_spend_the_nonce(alice: Keypair, bob: Keypair) -> None:
    guard = ReplayGuard()
    genuine = build_auth(alice)
    forged = dict(genuine, signature=bob.sign(reference_text(genuine)).hex())
    assert auth_reason(forged, guard=guard) == "bad signature"
    assert check_auth(genuine, guard=guard).hotkey == alice.ss58_address


def test_auth_not_registered(alice: Keypair, bob: Keypair) -> None:
    registered = {bob.ss58_address}
    frame = build_auth(alice)
    assert auth_reason(frame, allowed=registered.__contains__) == "hotkey not registered"
    assert check_auth(build_auth(bob), allowed=registered.__contains__).hotkey == bob.ss58_address


def test_unregistered_hotkey_does_not_spend_the_nonce(alice: Keypair) -> None:
    guard = ReplayGuard()
    frame = build_auth(alice)
    assert auth_reason(frame, guard=guard, allowed=lambda _: False) == "hotkey not registered"
    assert check_auth(frame, guard=guard).hotkey == alice.ss58_address
