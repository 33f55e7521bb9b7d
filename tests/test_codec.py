"""decode/encode: round trips, and a DecodeError with a usable reason for every bad frame."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from bittensor_wallet import Keypair

from bettensor_ws import (
    ConfirmationMessage,
    DecodeError,
    ErrorMessage,
    GameUpdateMessage,
    HeartbeatAckMessage,
    HeartbeatMessage,
    PredictionMessage,
    WebSocketMessage,
    WelcomeMessage,
    decode,
    encode,
    sign,
    verify,
)
from bettensor_ws.protocol.codec import DEFAULT_MAX_SIZE, MAX_DEPTH

GAME = {
    "game_id": 42,
    "team_a": "Lions",
    "team_b": "Tigers",
    "sport": "football",
    "league": "NFL",
    "event_start_date": "2024-09-08T17:00:00+00:00",
    "team_a_odds": 1.8,
    "team_b_odds": 2.1,
    "tie_odds": 3.5,
    "can_tie": True,
}

SAMPLES: list[WebSocketMessage] = [
    PredictionMessage(
        sender="miner",
        data={"prediction_id": "p1", "game_id": 42, "predicted_outcome": "Lions", "wager": 5.5},
    ),
    PredictionMessage(sender="miner", data={"id": "p1", "wager": 1}),
    PredictionMessage(sender="miner", data={"predictions": [{"prediction_id": "a"}, {"id": "b"}]}),
    ConfirmationMessage(sender="validator", data={"status": "success", "prediction_id": "p1"}),
    ConfirmationMessage(sender="validator", data={"status": "error", "message": "bad"}),
    ConfirmationMessage(
        sender="validator", data={"results": [{"prediction_id": "a", "status": "success"}]}
    ),
    GameUpdateMessage(sender="validator", data={"games": [GAME], "timestamp": "t"}),
    HeartbeatMessage(sender="miner", data={}),
    HeartbeatAckMessage(sender="validator", data={"echo": "n"}),
    WelcomeMessage(sender="validator", data={"features": ["batch"]}),
    ErrorMessage(sender="validator", data={"message": "no handler"}),
    HeartbeatMessage(sender="miner", data={"text": "naïve ☃ \U0001f600"}, signature="ab" * 64),
]


def ident(message: WebSocketMessage) -> str:
    return message.type


def frame(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "prediction",
        "sender": "5Sender",
        "data": {"prediction_id": "p1", "wager": 1.0},
        "timestamp": "2024-09-03T00:00:00+00:00",
        "nonce": "n-1",
        "signature": None,
    }
    base.update(overrides)
    return base


def text(**overrides: Any) -> str:
    return json.dumps(frame(**overrides))


def reason(raw: Any, **kwargs: Any) -> str:
    with pytest.raises(DecodeError) as info:
        decode(raw, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("message", SAMPLES, ids=ident)
def test_round_trip(message: WebSocketMessage) -> None:
    decoded = decode(encode(message))
    assert type(decoded) is type(message)
    assert decoded == message
    assert decoded.to_dict() == message.to_dict()


@pytest.mark.parametrize("message", SAMPLES, ids=ident)
def test_round_trip_bytes(message: WebSocketMessage) -> None:
    assert decode(encode(message).encode("utf-8")) == message


@pytest.mark.parametrize("message", SAMPLES, ids=ident)
def test_signed_round_trip_still_verifies(message: WebSocketMessage, alice: Keypair) -> None:
    signed = sign(message, alice)
    decoded = decode(encode(signed))
    assert decoded == signed
    assert verify(decoded)


def test_encode_writes_exactly_the_envelope_keys() -> None:
    message = PredictionMessage(sender="miner", data={"prediction_id": "p1"})
    wire = json.loads(encode(message))
    assert wire == {
        "type": "prediction",
        "sender": "miner",
        "data": {"prediction_id": "p1"},
        "timestamp": message.timestamp,
        "nonce": message.nonce,
        "signature": None,
    }


def test_decode_reads_reference_style_json() -> None:
    # Python's json.dumps (spaces after separators, ensure_ascii escapes) is accepted too.
    raw = json.dumps(frame(data={"prediction_id": "p\u00e9", "wager": 2}))
    assert "\\u00e9" in raw
    decoded = decode(raw)
    assert isinstance(decoded, PredictionMessage)
    assert decoded.data == {"prediction_id": "p\u00e9", "wager": 2}


# --------------------------------------------------------------------------- envelope shape


def test_signature_absent_is_unsigned() -> None:
    raw = frame()
    del raw["signature"]
    decoded = decode(json.dumps(raw))
    assert decoded.signature is None


def test_signature_null_is_unsigned() -> None:
    assert decode(text(signature=None)).signature is None


def test_signature_string_is_kept() -> None:
    assert decode(text(signature="ab" * 64)).signature == "ab" * 64


def test_signature_of_wrong_type_is_refused() -> None:
    assert "signature" in reason(text(signature=5))


def test_str_and_bytes_input_agree() -> None:
    raw = text()
    assert decode(raw) == decode(raw.encode("utf-8"))


@pytest.mark.parametrize("missing", ["type", "sender", "data", "timestamp", "nonce"])
def test_missing_field(missing: str) -> None:
    raw = frame()
    del raw[missing]
    assert reason(json.dumps(raw)) == f"missing field {missing!r}"


def test_extra_top_level_key_is_rejected() -> None:
    raw = frame(priority="high")
    assert "'priority'" in reason(json.dumps(raw))


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("type", 5, "type: expected a string"),
        ("sender", 5, "sender: expected a string"),
        ("timestamp", None, "timestamp: expected a string"),
        ("nonce", ["n"], "nonce: expected a string"),
        ("data", [], "data: expected an object"),
        ("data", "x", "data: expected an object"),
    ],
)
def test_envelope_field_types(field: str, value: Any, expected: str) -> None:
    assert reason(text(**{field: value})).startswith(expected)


def test_unknown_message_type() -> None:
    assert reason(text(type="x")) == "unknown message type 'x'"


# --------------------------------------------------------------------------- JSON level


def test_invalid_json_names_the_position() -> None:
    message = reason('{"type": "prediction",')
    assert message.startswith("invalid JSON")
    assert "line 1" in message and "column" in message


def test_invalid_json_position_points_at_the_fault() -> None:
    message = reason('{"type": ?}')
    assert "column 10" in message or "char 9" in message


def test_empty_input() -> None:
    assert reason("").startswith("invalid JSON")
    assert reason(b"").startswith("invalid JSON")


@pytest.mark.parametrize(
    ("raw", "kind"),
    [("[1, 2]", "an array"), ("42", "the number 42"), ("null", "null"), ('"hi"', "the string")],
)
def test_not_an_object(raw: str, kind: str) -> None:
    message = reason(raw)
    assert message.startswith("expected a JSON object")
    assert kind in message


def test_invalid_utf8_bytes() -> None:
    raw = text(sender="XX").encode("utf-8").replace(b"XX", b"\xff\xfe")
    assert "UTF-8" in reason(raw)


def test_lone_surrogate_in_text() -> None:
    raw = '{"type": "heartbeat", "sender": "\ud800"}'
    assert "UTF-8" in reason(raw)


@pytest.mark.parametrize("raw", [42, None, 1.5, ["x"], {"type": "heartbeat"}])
def test_non_text_input_is_a_decode_error(raw: Any) -> None:
    reason(raw)


def test_over_the_size_limit() -> None:
    raw = text(data={"prediction_id": "p", "pad": "x" * 2000})
    size = len(raw.encode("utf-8"))
    assert reason(raw, max_size=1000) == f"message of {size} bytes over the limit of 1000 bytes"


def test_size_limit_counts_bytes_not_characters() -> None:
    # ensure_ascii=False so each é is two bytes on the wire
    raw = json.dumps(frame(data={"prediction_id": "p", "pad": "\u00e9" * 100}), ensure_ascii=False)
    size = len(raw.encode("utf-8"))
    assert size > len(raw)
    assert f"message of {size} bytes" in reason(raw, max_size=len(raw))


def test_size_limit_boundary() -> None:
    raw = text()
    size = len(raw.encode("utf-8"))
    assert decode(raw, max_size=size).nonce == "n-1"
    assert f"message of {size} bytes" in reason(raw, max_size=size - 1)


def test_default_size_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_SIZE == 1 << 20
    raw = text(data={"prediction_id": "p", "pad": "x" * DEFAULT_MAX_SIZE})
    assert "over the limit of 1048576 bytes" in reason(raw)


@pytest.mark.parametrize("number", ["1e400", "-1e400"])
def test_overflowing_number_is_non_finite(number: str) -> None:
    raw = text(data={"prediction_id": "p"}).replace(
        '"prediction_id"', f'"wager": {number}, "prediction_id"'
    )
    assert reason(raw).startswith("non-finite number")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literal(literal: str) -> None:
    # Python's json.dumps writes these by default; they are not JSON.
    raw = json.dumps(frame(data={"prediction_id": "p", "wager": float(literal)}))
    assert literal in raw
    message = reason(raw)
    assert message.startswith("non-finite number")
    assert literal in message


def test_nesting_too_deep() -> None:
    nested: Any = "leaf"
    for _ in range(MAX_DEPTH + 5):
        nested = [nested]
    message = reason(text(type="heartbeat", data={"x": nested}))
    assert message == f"nesting too deep (more than {MAX_DEPTH} levels)"


def test_pathologically_deep_nesting() -> None:
    raw = '{"type": "heartbeat", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert reason(raw).startswith("nesting too deep")


def test_moderate_nesting_is_fine() -> None:
    nested: Any = 1
    for _ in range(10):
        nested = {"k": nested}
    decoded = decode(text(type="heartbeat", data={"x": nested}))
    assert decoded.data == {"x": nested}


# --------------------------------------------------------------------------- payloads


def test_wager_must_be_a_number() -> None:
    raw = text(data={"prediction_id": "p1", "wager": "abc"})
    assert reason(raw) == "data.wager: expected a number, got 'abc'"


def test_boolean_is_not_a_number() -> None:
    assert reason(text(data={"prediction_id": "p1", "wager": True})) == (
        "data.wager: expected a number, got True"
    )


def test_prediction_needs_an_id() -> None:
    assert reason(text(data={"wager": 1})) == "data.prediction_id: required field missing"


@pytest.mark.parametrize(
    ("message_type", "data", "expected"),
    [
        ("game_update", {"games": {}}, "data.games: expected a list"),
        ("game_update", {"games": ["x"]}, "data.games[0]: expected an object, got 'x'"),
        (
            "game_update",
            {"games": [{"game_id": 1, "team_b": "B", "event_start_date": "t"}]},
            "data.games[0].team_a: required field missing",
        ),
        (
            "game_update",
            {"games": [{**GAME, "can_tie": "yes"}]},
            "data.games[0].can_tie: expected true or false, got 'yes'",
        ),
        ("confirmation", {"message": "x"}, "data.status: required field missing"),
        ("confirmation", {"status": "ok"}, "data.status: expected 'success' or 'error', got 'ok'"),
        (
            "confirmation",
            {"results": [{"prediction_id": "a", "status": "success"}, {"status": "error"}]},
            "data.results[1].prediction_id: required field missing",
        ),
        ("error", {"message": 3}, "data.message: expected a string"),
        (
            "prediction",
            {"predictions": [{"prediction_id": "a"}] * 1001},
            "data.predictions: 1001 predictions over the limit of 1000",
        ),
    ],
)
def test_payload_errors_name_the_field(message_type: str, data: Any, expected: str) -> None:
    assert reason(text(type=message_type, data=data)) == expected


def test_optional_numbers_may_be_null() -> None:
    decoded = decode(text(data={"prediction_id": "p", "wager": None, "tie_odds": None}))
    assert isinstance(decoded, PredictionMessage)
    assert decoded.prediction.wager is None


def test_unknown_payload_keys_are_kept() -> None:
    data = {"prediction_id": "p", "future_field": "a"}
    decoded = decode(text(data=data))
    assert decoded.data == data


def test_a_prediction_field_is_a_scalar_and_there_are_few() -> None:
    """Nested or numerous extras would cost the validator ten times their size in memory."""
    with pytest.raises(DecodeError, match=r"data\.future_field: expected a number, string, boolean or null"):
        decode(text(data={"prediction_id": "p", "future_field": {"a": 1}}))
    many = {"prediction_id": "p", **{f"k{i}": i for i in range(40)}}
    with pytest.raises(DecodeError, match="41 fields over the limit of 32"):
        decode(text(data=many))


def test_decoded_frame_is_the_same_json() -> None:
    raw = text()
    assert orjson.loads(encode(decode(raw))) == json.loads(raw)
