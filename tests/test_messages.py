"""Message classes, the type registry, and the typed payload views."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, ClassVar

import attrs
import pytest

import bettensor_ws
from bettensor_ws import (
    Confirmation,
    ConfirmationMessage,
    ConfirmationResult,
    DecodeError,
    ErrorMessage,
    GameUpdateMessage,
    HeartbeatAckMessage,
    HeartbeatMessage,
    MessageTypeConflict,
    PredictionMessage,
    TeamGame,
    TeamGamePrediction,
    WebSocketMessage,
    WelcomeMessage,
    decode,
    encode,
    message_types,
)
from bettensor_ws.protocol import messages as messages_module

BUILTIN_TYPES: dict[str, type[WebSocketMessage]] = {
    "prediction": PredictionMessage,
    "confirmation": ConfirmationMessage,
    "game_update": GameUpdateMessage,
    "heartbeat": HeartbeatMessage,
    "heartbeat_ack": HeartbeatAckMessage,
    "welcome": WelcomeMessage,
    "error": ErrorMessage,
}

GAME = {
    "game_id": "g-1",
    "team_a": "Lions",
    "team_b": "Tigers",
    "sport": "football",
    "league": "NFL",
    "create_date": "2024-09-01T00:00:00+00:00",
    "last_update_date": "2024-09-02T00:00:00+00:00",
    "event_start_date": "2024-09-08T17:00:00+00:00",
    "active": True,
    "outcome": "Unfinished",
    "team_a_odds": 1.8,
    "team_b_odds": 2.1,
    "tie_odds": None,
    "can_tie": False,
}

PREDICTION = {
    "prediction_id": "pred-1",
    "game_id": "g-1",
    "miner_uid": 7,
    "prediction_date": "2024-09-03T00:00:00+00:00",
    "predicted_outcome": "Lions",
    "predicted_odds": 1.8,
    "team_a": "Lions",
    "team_b": "Tigers",
    "wager": 10,
    "team_a_odds": 1.8,
    "team_b_odds": 2.1,
    "tie_odds": None,
    "model_name": "m1",
    "confidence_score": 0.6,
    "outcome": "Unfinished",
    "payout": 0,
}


@pytest.fixture
def registry() -> Iterator[dict[str, type[WebSocketMessage]]]:
    """Restore the global registry after a test that defines message classes."""
    saved = dict(messages_module._REGISTRY)
    try:
        yield messages_module._REGISTRY
    finally:
        messages_module._REGISTRY.clear()
        messages_module._REGISTRY.update(saved)


def envelope(message_type: str, data: dict[str, Any]) -> str:
    return json.dumps(
        {
            "type": message_type,
            "sender": "5Sender",
            "data": data,
            "timestamp": "2024-09-03T00:00:00+00:00",
            "nonce": "n-1",
        }
    )


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize(("message_type", "cls"), sorted(BUILTIN_TYPES.items()))
def test_builtin_type_maps_to_its_class(message_type: str, cls: type[WebSocketMessage]) -> None:
    assert message_types()[message_type] is cls
    assert cls.MESSAGE_TYPE == message_type
    assert cls(sender="s", data={}).type == message_type


def test_public_names_import_from_package() -> None:
    for cls in BUILTIN_TYPES.values():
        assert getattr(bettensor_ws, cls.__name__) is cls
    for name in ("TeamGame", "TeamGamePrediction", "Confirmation", "decode", "encode"):
        assert hasattr(bettensor_ws, name)


def test_registry_view_is_read_only() -> None:
    view = message_types()
    with pytest.raises(TypeError):
        view["custom"] = WebSocketMessage  # type: ignore[index]


def test_plain_subclass_registers_and_decodes(registry: dict[str, Any]) -> None:
    class PlainMessage(WebSocketMessage):
        MESSAGE_TYPE = "plain_test"

        def __init__(self, sender: str, data: dict[str, Any]) -> None:
            super().__init__(sender, data)
            self.level = data.get("level", "low")

    assert message_types()["plain_test"] is PlainMessage
    decoded = decode(envelope("plain_test", {"level": "high"}))
    assert type(decoded) is PlainMessage
    assert decoded.level == "high"
    assert decoded.sender == "5Sender"
    assert decoded.timestamp == "2024-09-03T00:00:00+00:00"
    assert decoded.nonce == "n-1"


def test_attrs_subclass_registers(registry: dict[str, Any]) -> None:
    @attrs.define
    class AttrsMessage(WebSocketMessage):
        MESSAGE_TYPE: ClassVar[str] = "attrs_test"

    assert message_types()["attrs_test"] is AttrsMessage
    assert type(decode(envelope("attrs_test", {}))) is AttrsMessage


def test_subclass_without_own_type_does_not_register(registry: dict[str, Any]) -> None:
    class SpecialPrediction(PredictionMessage):
        pass

    assert message_types()["prediction"] is PredictionMessage
    assert SpecialPrediction.MESSAGE_TYPE == "prediction"


def test_other_class_claiming_builtin_type_raises(registry: dict[str, Any]) -> None:
    with pytest.raises(MessageTypeConflict, match="'prediction'"):

        class Impostor(WebSocketMessage):
            MESSAGE_TYPE = "prediction"

    assert message_types()["prediction"] is PredictionMessage


def test_other_class_claiming_custom_type_raises(registry: dict[str, Any]) -> None:
    class First(WebSocketMessage):
        MESSAGE_TYPE = "claimed_test"

    with pytest.raises(MessageTypeConflict):

        class Second(WebSocketMessage):
            MESSAGE_TYPE = "claimed_test"

    assert message_types()["claimed_test"] is First


def test_same_class_from_another_module_conflicts(registry: dict[str, Any]) -> None:
    namespace: dict[str, Any] = {"__name__": "someone_else", "WebSocketMessage": WebSocketMessage}
    with pytest.raises(MessageTypeConflict):
        exec(
            "class HeartbeatMessage(WebSocketMessage):\n    MESSAGE_TYPE = 'heartbeat'\n", namespace
        )
    assert message_types()["heartbeat"] is HeartbeatMessage


def test_redefining_same_class_replaces_it(registry: dict[str, Any]) -> None:
    defined = []
    for version in (1, 2):

        class Redefined(WebSocketMessage):
            MESSAGE_TYPE = "redefined_test"
            VERSION = version

        defined.append(Redefined)

    assert defined[0] is not defined[1]
    assert message_types()["redefined_test"] is defined[1]
    decoded = decode(envelope("redefined_test", {}))
    assert type(decoded) is defined[1]


@pytest.mark.parametrize("bad_type", ["", 5, None])
def test_message_type_must_be_a_non_empty_string(registry: dict[str, Any], bad_type: Any) -> None:
    with pytest.raises(TypeError):

        class Bad(WebSocketMessage):
            MESSAGE_TYPE = bad_type


def test_class_whose_init_needs_more_than_envelope_fails_decode_cleanly(
    registry: dict[str, Any],
) -> None:
    class NeedsMore(WebSocketMessage):
        MESSAGE_TYPE = "needs_more_test"

        def __init__(self, sender: str, data: dict[str, Any], extra: int) -> None:
            super().__init__(sender, data)

    with pytest.raises(DecodeError, match="needs_more_test"):
        decode(envelope("needs_more_test", {}))


# --------------------------------------------------------------------------- envelope


def test_defaults_fresh_utc_timestamp_and_unique_nonce() -> None:
    before = datetime.now(UTC)
    first = HeartbeatMessage(sender="s", data={})
    second = HeartbeatMessage(sender="s", data={})
    stamp = datetime.fromisoformat(first.timestamp)
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs((stamp - before).total_seconds()) < 5
    assert first.nonce and second.nonce and first.nonce != second.nonce
    assert first.signature is None


def test_to_dict_has_exactly_the_reference_keys() -> None:
    message = PredictionMessage(sender="s", data={"prediction_id": "p"})
    wire = message.to_dict()
    assert set(wire) == {"type", "sender", "data", "timestamp", "nonce", "signature"}
    assert wire["type"] == "prediction"
    assert wire["data"] == {"prediction_id": "p"}


def test_seed_positional_construction() -> None:
    message = ConfirmationMessage("validator_hotkey", {"prediction_id": "x", "status": "success"})
    assert message.sender == "validator_hotkey"
    assert message.data == {"prediction_id": "x", "status": "success"}


# --------------------------------------------------------------------------- typed views


def test_prediction_view_with_prediction_id() -> None:
    data = dict(PREDICTION)
    message = PredictionMessage(sender="s", data=data)
    view = message.prediction
    assert isinstance(view, TeamGamePrediction)
    assert view.prediction_id == "pred-1"
    assert view.wager == 10.0 and isinstance(view.wager, float)
    assert view.miner_uid == 7
    assert view.tie_odds is None
    assert message.data is data
    assert message.data == PREDICTION


def test_prediction_view_accepts_id_and_keeps_data_as_received() -> None:
    data = {"id": "seed-1", "game_id": "g-1", "wager": 2.5}
    message = PredictionMessage(sender="s", data=data)
    assert message.prediction.prediction_id == "seed-1"
    assert message.data == {"id": "seed-1", "game_id": "g-1", "wager": 2.5}
    # also through the wire: the "id" key travels unchanged
    decoded = decode(envelope("prediction", data))
    assert isinstance(decoded, PredictionMessage)
    assert decoded.data == {"id": "seed-1", "game_id": "g-1", "wager": 2.5}
    assert decoded.prediction.prediction_id == "seed-1"


def test_prediction_id_wins_over_id_when_both_present() -> None:
    message = PredictionMessage(sender="s", data={"prediction_id": "a", "id": "b"})
    assert message.prediction.prediction_id == "a"


def test_prediction_view_rejects_a_bad_payload() -> None:
    message = PredictionMessage(sender="s", data={"prediction_id": "p", "wager": "abc"})
    with pytest.raises(DecodeError, match=r"data\.wager: expected a number, got 'abc'"):
        _ = message.prediction


def test_single_prediction_is_not_a_batch() -> None:
    message = PredictionMessage(sender="s", data=dict(PREDICTION))
    assert not message.is_batch
    assert [p.prediction_id for p in message.predictions] == ["pred-1"]
    assert message.raw_predictions() == [PREDICTION]


def test_batch_prediction_views() -> None:
    items = [dict(PREDICTION), {"id": "pred-2", "wager": 3}]
    message = PredictionMessage(sender="s", data={"predictions": items})
    assert message.is_batch
    assert [p.prediction_id for p in message.predictions] == ["pred-1", "pred-2"]
    assert message.prediction.prediction_id == "pred-1"
    assert message.raw_predictions() == items


def test_batch_prediction_error_names_the_item() -> None:
    """A batch decodes whatever its items; each bad item is named by item_problems."""
    data = {"predictions": [dict(PREDICTION), {"prediction_id": 3}, {**PREDICTION, "model_name": "x" * 5000}]}
    message = decode(envelope("prediction", data))
    assert isinstance(message, PredictionMessage)
    problems = message.item_problems()
    assert problems[0] is None
    assert problems[1] is not None and problems[1].startswith("data.predictions[1].prediction_id")
    assert problems[2] is not None and "over the limit of 4096 bytes" in problems[2]
    assert [p.prediction_id for p in message.predictions] == [PREDICTION["prediction_id"]]


def test_game_update_games_view() -> None:
    message = GameUpdateMessage(sender="s", data={"games": [GAME], "timestamp": "t"})
    (game,) = message.games
    assert isinstance(game, TeamGame)
    assert game.game_id == "g-1"
    assert (game.team_a, game.team_b) == ("Lions", "Tigers")
    assert game.team_a_odds == 1.8
    assert game.tie_odds is None
    assert game.can_tie is False
    assert message.data["games"] == [GAME]


def test_game_update_without_games_is_empty() -> None:
    assert GameUpdateMessage(sender="s", data={}).games == []


def test_confirmation_view_for_seed_error_reply() -> None:
    message = ConfirmationMessage(sender="s", data={"status": "error", "message": "bad odds"})
    confirmation = message.confirmation
    assert isinstance(confirmation, Confirmation)
    assert confirmation.status == "error"
    assert confirmation.message == "bad odds"
    assert confirmation.prediction_id is None
    assert confirmation.timestamp is None
    assert not message.is_batch


def test_confirmation_view_success_with_stats() -> None:
    data = {
        "status": "success",
        "prediction_id": "pred-1",
        "timestamp": "2024-09-03T00:00:00+00:00",
        "miner_stats": {"earnings": 1.5},
    }
    confirmation = ConfirmationMessage(sender="s", data=data).confirmation
    assert confirmation.prediction_id == "pred-1"
    assert confirmation.timestamp == "2024-09-03T00:00:00+00:00"
    assert confirmation.miner_stats == {"earnings": 1.5}
    assert ConfirmationMessage(sender="s", data=data).results == [
        ConfirmationResult("pred-1", "success", "")
    ]


def test_batch_confirmation_results() -> None:
    data = {
        "results": [
            {"prediction_id": "a", "status": "success"},
            {"prediction_id": "b", "status": "error", "message": "duplicate"},
        ]
    }
    message = ConfirmationMessage(sender="s", data=data)
    assert message.is_batch
    assert message.results == [
        ConfirmationResult("a", "success", ""),
        ConfirmationResult("b", "error", "duplicate"),
    ]
    assert message.confirmation.prediction_id == "a"
    assert message.confirmation.status == "success"


def test_confirmation_status_is_checked() -> None:
    with pytest.raises(DecodeError, match=r"data\.status"):
        decode(envelope("confirmation", {"status": "maybe"}))


def test_welcome_features_and_error_message() -> None:
    welcome = WelcomeMessage(sender="s", data={"features": ["batch", 3, "stats"]})
    assert welcome.features == frozenset({"batch", "stats"})
    assert WelcomeMessage(sender="s", data={}).features == frozenset()
    assert ErrorMessage(sender="s", data={"message": "nope"}).message == "nope"


def test_views_survive_a_round_trip() -> None:
    message = GameUpdateMessage(sender="s", data={"games": [GAME]})
    decoded = decode(encode(message))
    assert isinstance(decoded, GameUpdateMessage)
    assert decoded.games == message.games


# --------------------------------------------------------------------------- ids and nonces


def test_new_uuid_and_nonce_are_version_4_and_never_repeat() -> None:
    import uuid

    from bettensor_ws.protocol.messages import new_nonce, new_uuid

    ids = [new_uuid() for _ in range(5000)]  # crosses many 4 KiB pages of the pool
    assert len(set(ids)) == len(ids)
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in ids)
    nonces = {new_nonce() for _ in range(5000)}
    assert len(nonces) == 5000
    assert all(len(n) == 32 and uuid.UUID(hex=n).version == 4 for n in nonces)


def test_a_forked_child_never_repeats_its_parents_ids() -> None:
    import os

    from bettensor_ws.protocol.messages import new_nonce

    new_nonce()  # the pool holds unused bytes when the fork happens
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, "".join(new_nonce() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    child = {text[i : i + 32] for i in range(0, len(text), 32)}
    parent = {new_nonce() for _ in range(8)}
    assert len(child) == 8
    assert not child & parent
