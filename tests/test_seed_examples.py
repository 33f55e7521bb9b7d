"""The handler guide's code, executed verbatim against bettensor_ws.

The ```python blocks of tests/data/websocket-handlers.md (a copy of the original
seed guide) are extracted and exec'd unchanged in a namespace that supplies the
guide's free names: our message classes and MockWebSocket, plus in-memory fakes
for the application functions it calls (validate_prediction, store_prediction,
update_prediction_status, get_prediction, update_game,
trigger_predictions_for_updated_games).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bittensor_wallet import Keypair

from bettensor_ws import (
    ConfirmationMessage,
    Dispatcher,
    GameUpdateMessage,
    HeartbeatMessage,
    PredictionMessage,
    WebSocketMessage,
    decode,
    encode,
    sign,
    verify,
)
from bettensor_ws.protocol import messages as messages_module
from bettensor_ws.testing import MockWebSocket

REPO_ROOT = Path(__file__).resolve().parents[1]
GUIDE = REPO_ROOT / "tests" / "data" / "websocket-handlers.md"
SHARED_GUIDE = REPO_ROOT.parent / "shared" / "seed" / "websocket-handlers.md"
SEED_MODULE = "seed_websocket_handlers"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(encoding="utf-8"), re.M | re.S)


def is_placeholder_setup(block: str) -> bool:
    # `ValidatorWebSocketManager(...)` / `MinerWebSocketManager(...)`: the guide's
    # "fill in your own arguments" setup cannot run with a literal Ellipsis, so
    # those blocks are not executed here; the runtime tests cover registration
    # on the real managers.
    return "(...)" in block


def block_defining(name: str) -> str:
    (block,) = [b for b in python_blocks() if re.search(rf"^(async def|class) {name}\b", b, re.M)]
    return block


# --------------------------------------------------------------------------- fakes


class StoredPrediction:
    def __init__(self, prediction_id: str, status: str, error: str | None = None) -> None:
        self.prediction_id = prediction_id
        self.status = status
        self.error = error


class Application:
    """The miner's and validator's storage, in memory."""

    def __init__(self) -> None:
        self.stored: list[dict[str, Any]] = []
        self.predictions: dict[Any, StoredPrediction] = {}
        self.games: dict[Any, dict[str, Any]] = {}
        self.triggered: list[list[dict[str, Any]]] = []
        self.fail_store = False

    def validate_prediction(self, data: dict[str, Any]) -> tuple[bool, str]:
        if not data.get("id") and not data.get("prediction_id"):
            return False, "missing prediction id"
        wager = data.get("wager")
        if not isinstance(wager, int | float) or isinstance(wager, bool) or wager <= 0:
            return False, "wager must be positive"
        return True, ""

    def store_prediction(self, data: dict[str, Any]) -> None:
        if self.fail_store:
            raise OSError("database is locked")
        self.stored.append(data)

    def update_prediction_status(
        self, prediction_id: Any, status: str, error_message: str | None = None
    ) -> None:
        self.predictions[prediction_id] = StoredPrediction(prediction_id, status, error_message)

    def get_prediction(self, prediction_id: Any) -> StoredPrediction:
        return self.predictions[prediction_id]

    def update_game(self, game: dict[str, Any]) -> None:
        self.games[game["game_id"]] = game

    def trigger_predictions_for_updated_games(self, games: list[dict[str, Any]]) -> None:
        self.triggered.append(list(games))


class Seed:
    def __init__(self, namespace: dict[str, Any], app: Application) -> None:
        self.ns = namespace
        self.app = app

    def __getattr__(self, name: str) -> Any:
        return self.ns[name]


@pytest.fixture
def seed() -> Iterator[Seed]:
    """A namespace holding every runnable block of the guide, exec'd verbatim."""
    saved = dict(messages_module._REGISTRY)
    messages_module._REGISTRY.pop("custom", None)  # whoever else registered it
    app = Application()
    namespace: dict[str, Any] = {
        "__name__": SEED_MODULE,
        "logging": logging,
        "WebSocketMessage": WebSocketMessage,
        "PredictionMessage": PredictionMessage,
        "ConfirmationMessage": ConfirmationMessage,
        "GameUpdateMessage": GameUpdateMessage,
        "HeartbeatMessage": HeartbeatMessage,
        "MockWebSocket": MockWebSocket,
        "validate_prediction": app.validate_prediction,
        "store_prediction": app.store_prediction,
        "update_prediction_status": app.update_prediction_status,
        "get_prediction": app.get_prediction,
        "update_game": app.update_game,
        "trigger_predictions_for_updated_games": app.trigger_predictions_for_updated_games,
        # the object the guide's last block registers on; Dispatcher has the
        # guide's register_handler spelling
        "websocket_manager": Dispatcher(),
    }
    try:
        for index, block in enumerate(python_blocks()):
            if is_placeholder_setup(block):
                continue
            exec(compile(block, f"<{GUIDE.name} block {index}>", "exec"), namespace)
        yield Seed(namespace, app)
    finally:
        messages_module._REGISTRY.clear()
        messages_module._REGISTRY.update(saved)


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --------------------------------------------------------------------------- the guide itself


def test_guide_is_the_shared_seed() -> None:
    if not SHARED_GUIDE.exists():
        pytest.skip(f"{SHARED_GUIDE} not present")
    assert GUIDE.read_bytes() == SHARED_GUIDE.read_bytes()


def test_every_block_is_accounted_for() -> None:
    blocks = python_blocks()
    assert len(blocks) == 9
    skipped = [b for b in blocks if is_placeholder_setup(b)]
    assert len(skipped) == 2
    assert all("register_handler" in b for b in skipped)
    for name in (
        "handle_prediction",
        "handle_confirmation",
        "handle_game_updates",
        "CustomMessage",
        "handle_custom_message",
        "test_confirmation_handler",
    ):
        assert block_defining(name) not in skipped


def test_blocks_define_the_guide_names(seed: Seed) -> None:
    for name in (
        "handle_prediction",
        "handle_confirmation",
        "handle_game_updates",
        "handle_custom_message",
        "test_confirmation_handler",
    ):
        assert callable(seed.ns[name])
    assert issubclass(seed.CustomMessage, WebSocketMessage)
    assert seed.websocket_manager.handlers == {"custom": seed.handle_custom_message}


# --------------------------------------------------------------------------- example unit test


async def test_guide_example_unit_test_runs(seed: Seed, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        await seed.test_confirmation_handler()
    assert seed.app.get_prediction("test_id").status == "confirmed"
    assert no_errors_logged(caplog)
    assert "Prediction test_id confirmed by validator validator_hotkey" in caplog.text


async def test_confirmation_handler_rejection(seed: Seed, caplog: pytest.LogCaptureFixture) -> None:
    message = ConfirmationMessage(
        sender="validator_hotkey",
        data={"prediction_id": "p2", "status": "error", "message": "game already started"},
    )
    with caplog.at_level(logging.INFO):
        await seed.handle_confirmation(MockWebSocket(), message)
    stored = seed.app.get_prediction("p2")
    assert (stored.status, stored.error) == ("rejected", "game already started")
    assert no_errors_logged(caplog)


# --------------------------------------------------------------------------- handle_prediction


def miner_frame(keypair: Keypair, data: dict[str, Any]) -> str:
    """A prediction frame as a miner would put it on the wire, signed."""
    return encode(sign(PredictionMessage(sender="", data=data), keypair))


async def test_handle_prediction_accepts_valid_data(
    seed: Seed, alice: Keypair, caplog: pytest.LogCaptureFixture
) -> None:
    data = {"id": "pred-42", "game_id": "g-1", "predicted_outcome": "Lions", "wager": 5.0}
    message = decode(miner_frame(alice, data))
    assert isinstance(message, PredictionMessage) and verify(message)
    websocket = MockWebSocket(hotkey="validator_hotkey")
    with caplog.at_level(logging.INFO):
        await seed.handle_prediction(websocket, message)

    assert seed.app.stored == [data]
    (reply,) = websocket.sent
    assert isinstance(reply, ConfirmationMessage)
    assert reply.sender == "validator_hotkey"
    assert reply.confirmation.status == "success"
    assert reply.confirmation.prediction_id == "pred-42"
    assert reply.data == {"status": "success", "prediction_id": "pred-42"}
    assert no_errors_logged(caplog)
    assert f"Received prediction via WebSocket from {alice.ss58_address}" in caplog.text


async def test_handle_prediction_rejects_invalid_data(seed: Seed, alice: Keypair) -> None:
    message = decode(miner_frame(alice, {"id": "pred-43", "wager": -1}))
    websocket = MockWebSocket()
    await seed.handle_prediction(websocket, message)

    assert seed.app.stored == []
    (reply,) = websocket.sent
    assert isinstance(reply, ConfirmationMessage)
    assert reply.confirmation.status == "error"
    assert reply.confirmation.message == "wager must be positive"
    assert reply.confirmation.prediction_id is None
    assert reply.confirmation.timestamp is None


async def test_handle_prediction_internal_error(
    seed: Seed, alice: Keypair, caplog: pytest.LogCaptureFixture
) -> None:
    seed.app.fail_store = True
    websocket = MockWebSocket()
    await seed.handle_prediction(websocket, decode(miner_frame(alice, {"id": "p", "wager": 1})))
    (reply,) = websocket.sent
    assert isinstance(reply, ConfirmationMessage)
    assert reply.confirmation.status == "error"
    assert reply.confirmation.message == "Internal server error"
    assert "database is locked" in caplog.text


async def test_handlers_served_through_the_dispatcher(seed: Seed, alice: Keypair) -> None:
    dispatcher = Dispatcher()
    dispatcher.register_handler("prediction", seed.handle_prediction)
    websocket = MockWebSocket()
    for pid, wager in (("a", 1.0), ("b", 0), ("c", 2)):
        message = decode(miner_frame(alice, {"id": pid, "wager": wager}))
        assert await dispatcher.dispatch(websocket, message)
    assert [r.confirmation.status for r in websocket.sent] == ["success", "error", "success"]  # type: ignore[attr-defined]
    assert [d["id"] for d in seed.app.stored] == ["a", "c"]


# --------------------------------------------------------------------------- handle_game_updates


GAMES = [
    {
        "game_id": "g-1",
        "team_a": "Lions",
        "team_b": "Tigers",
        "sport": "football",
        "league": "NFL",
        "event_start_date": "2024-09-08T17:00:00+00:00",
        "team_a_odds": 1.8,
        "team_b_odds": 2.1,
    },
    {
        "game_id": 2,
        "team_a": "Reds",
        "team_b": "Blues",
        "event_start_date": "2024-09-09T19:00:00+00:00",
        "can_tie": True,
        "tie_odds": 3.2,
    },
]


async def test_handle_game_updates(
    seed: Seed, bob: Keypair, caplog: pytest.LogCaptureFixture
) -> None:
    frame = encode(sign(GameUpdateMessage(sender="", data={"games": GAMES}), bob))
    message = decode(frame)
    assert isinstance(message, GameUpdateMessage)
    assert [g.game_id for g in message.games] == ["g-1", 2]
    websocket = MockWebSocket()
    with caplog.at_level(logging.INFO):
        await seed.handle_game_updates(websocket, message)
    assert seed.app.games == {"g-1": GAMES[0], 2: GAMES[1]}
    assert seed.app.triggered == [GAMES]
    assert websocket.sent == []
    assert no_errors_logged(caplog)
    assert f"Received updates for 2 games from validator {bob.ss58_address}" in caplog.text


async def test_handle_game_updates_without_games(seed: Seed) -> None:
    await seed.handle_game_updates(MockWebSocket(), GameUpdateMessage(sender="v", data={}))
    assert seed.app.games == {}
    assert seed.app.triggered == []


# --------------------------------------------------------------------------- CustomMessage


def test_custom_message_registers(seed: Seed) -> None:
    assert messages_module.message_types()["custom"] is seed.CustomMessage


async def test_signed_custom_frame_decodes_to_custom_message(seed: Seed, alice: Keypair) -> None:
    original = seed.CustomMessage("someone", {"priority": "high", "body": "x"})
    assert original.priority == "high"
    signed = sign(original, alice)
    decoded: Any = decode(encode(signed))  # CustomMessage is exec'd from the guide: mypy can't see .priority
    assert type(decoded) is seed.CustomMessage
    assert decoded.priority == "high"
    assert decoded.data == {"priority": "high", "body": "x"}
    assert decoded.sender == alice.ss58_address
    assert verify(decoded)


def test_custom_frame_signed_by_hand_decodes(seed: Seed, alice: Keypair) -> None:
    envelope: dict[str, Any] = {
        "type": "custom",
        "sender": alice.ss58_address,
        "data": {"note": "no priority given"},
        "timestamp": datetime.now(UTC).isoformat(),
        "nonce": uuid.uuid4().hex,
    }
    envelope["signature"] = alice.sign(json.dumps(envelope, sort_keys=True)).hex()
    decoded: Any = decode(json.dumps(envelope))  # CustomMessage is exec'd from the guide: mypy can't see .priority
    assert type(decoded) is seed.CustomMessage
    assert decoded.priority == "normal"
    assert verify(decoded)


async def test_custom_handler_registered_as_the_guide_does(seed: Seed, alice: Keypair) -> None:
    frame = encode(sign(seed.CustomMessage("x", {"priority": "low"}), alice))
    websocket = MockWebSocket()
    assert await seed.websocket_manager.dispatch(websocket, decode(frame)) is True
    assert websocket.sent == []
