"""The dispatch table, the echo handler, and how send_json turns dicts into messages."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from bettensor_ws import (
    ConfirmationMessage,
    DecodeError,
    Dispatcher,
    ErrorMessage,
    GameUpdateMessage,
    HeartbeatMessage,
    PredictionMessage,
    WebSocketMessage,
    echo_handler,
)
from bettensor_ws.protocol.replies import to_message
from bettensor_ws.testing import MockWebSocket


def prediction(**data: Any) -> PredictionMessage:
    return PredictionMessage(sender="miner", data=data or {"prediction_id": "p1", "wager": 1.0})


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, WebSocketMessage]] = []

    async def __call__(self, websocket: Any, message: WebSocketMessage) -> None:
        self.calls.append((websocket, message))


async def boom(websocket: Any, message: WebSocketMessage) -> None:
    raise RuntimeError("handler exploded")


# --------------------------------------------------------------------------- table


def test_register_and_view() -> None:
    dispatcher = Dispatcher()
    recorder = Recorder()
    dispatcher.register_handler("prediction", recorder)
    assert dict(dispatcher.handlers) == {"prediction": recorder}


def test_register_replaces() -> None:
    dispatcher = Dispatcher()
    first, second = Recorder(), Recorder()
    dispatcher.register_handler("prediction", first)
    dispatcher.register_handler("prediction", second)
    assert dispatcher.handlers["prediction"] is second


def test_unregister() -> None:
    dispatcher = Dispatcher()
    recorder = Recorder()
    dispatcher.register_handler("prediction", recorder)
    assert dispatcher.unregister_handler("prediction") is recorder
    assert "prediction" not in dispatcher.handlers
    assert dispatcher.unregister_handler("prediction") is None


def test_view_is_read_only_and_live() -> None:
    dispatcher = Dispatcher()
    view = dispatcher.handlers
    with pytest.raises(TypeError):
        view["prediction"] = Recorder()  # type: ignore[index]
    with pytest.raises(TypeError):
        del view["prediction"]  # type: ignore[attr-defined]
    assert "prediction" not in dispatcher.handlers
    dispatcher.register_handler("heartbeat", Recorder())
    assert "heartbeat" in view


def test_non_callable_handler_is_refused() -> None:
    with pytest.raises(TypeError):
        Dispatcher().register_handler("prediction", "not a handler")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- dispatch


async def test_dispatch_awaits_the_handler() -> None:
    dispatcher = Dispatcher()
    websocket = MockWebSocket()
    seen: list[str] = []

    async def handler(ws: Any, message: WebSocketMessage) -> None:
        assert ws is websocket
        seen.append(message.data["prediction_id"])
        await ws.send_json({"type": "confirmation", "status": "success", "prediction_id": "p1"})
        seen.append("after await")

    dispatcher.register_handler("prediction", handler)
    assert await dispatcher.dispatch(websocket, prediction()) is True
    assert seen == ["p1", "after await"]
    assert len(websocket.sent) == 1
    assert isinstance(websocket.sent[0], ConfirmationMessage)


async def test_dispatch_routes_by_type() -> None:
    dispatcher = Dispatcher()
    predictions, heartbeats = Recorder(), Recorder()
    dispatcher.register_handler("prediction", predictions)
    dispatcher.register_handler("heartbeat", heartbeats)
    websocket = MockWebSocket()
    beat = HeartbeatMessage(sender="miner", data={})
    await dispatcher.dispatch(websocket, beat)
    assert [m for _, m in heartbeats.calls] == [beat]
    assert predictions.calls == []
    assert websocket.sent == []


async def test_no_handler_replies_with_an_error_naming_the_type() -> None:
    dispatcher = Dispatcher()
    websocket = MockWebSocket()
    assert await dispatcher.dispatch(websocket, GameUpdateMessage(sender="v", data={})) is False
    (reply,) = websocket.sent
    assert isinstance(reply, ErrorMessage)
    assert "game_update" in reply.message


async def test_raising_handler_is_logged_and_answered(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = Dispatcher()
    dispatcher.register_handler("prediction", boom)
    websocket = MockWebSocket()
    with caplog.at_level(logging.ERROR):
        assert await dispatcher.dispatch(websocket, prediction(prediction_id="p9")) is False
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError)
    assert "handler exploded" in caplog.text
    assert "Traceback" in caplog.text
    (reply,) = websocket.sent
    assert isinstance(reply, ConfirmationMessage)
    assert reply.confirmation.status == "error"
    assert reply.confirmation.message == "Internal server error"
    assert reply.confirmation.prediction_id == "p9"


async def test_raising_handler_for_seed_style_prediction_names_its_id() -> None:
    dispatcher = Dispatcher()
    dispatcher.register_handler("prediction", boom)
    websocket = MockWebSocket()
    await dispatcher.dispatch(websocket, prediction(id="seed-7"))
    (reply,) = websocket.sent
    assert isinstance(reply, ConfirmationMessage)
    assert reply.confirmation.prediction_id == "seed-7"
    assert reply.confirmation.message == "Internal server error"


async def test_raising_handler_for_a_batch() -> None:
    dispatcher = Dispatcher()
    dispatcher.register_handler("prediction", boom)
    websocket = MockWebSocket()
    batch = PredictionMessage(
        sender="miner", data={"predictions": [{"prediction_id": "a"}, {"prediction_id": "b"}]}
    )
    await dispatcher.dispatch(websocket, batch)
    (reply,) = websocket.sent
    assert isinstance(reply, ConfirmationMessage)
    assert reply.data["status"] == "error"
    assert reply.data["message"] == "Internal server error"


async def test_raising_handler_for_other_types_gets_an_error_reply() -> None:
    dispatcher = Dispatcher()
    dispatcher.register_handler("game_update", boom)
    websocket = MockWebSocket()
    await dispatcher.dispatch(websocket, GameUpdateMessage(sender="v", data={}))
    (reply,) = websocket.sent
    assert isinstance(reply, ErrorMessage)
    assert reply.message == "Internal server error"


async def test_dispatch_keeps_serving_after_a_failure() -> None:
    dispatcher = Dispatcher()
    served: list[str] = []

    async def flaky(ws: Any, message: WebSocketMessage) -> None:
        if message.data["prediction_id"] == "bad":
            raise ValueError("bad prediction")
        served.append(message.data["prediction_id"])

    dispatcher.register_handler("prediction", flaky)
    websocket = MockWebSocket()
    results = [
        await dispatcher.dispatch(websocket, prediction(prediction_id=pid))
        for pid in ("p1", "bad", "p2")
    ]
    assert results == [True, False, True]
    assert served == ["p1", "p2"]
    assert len(websocket.sent) == 1


async def test_dispatch_does_not_swallow_base_exceptions() -> None:
    class Stop(BaseException):
        pass

    async def stopper(ws: Any, message: WebSocketMessage) -> None:
        raise Stop

    dispatcher = Dispatcher()
    dispatcher.register_handler("heartbeat", stopper)
    with pytest.raises(Stop):
        await dispatcher.dispatch(MockWebSocket(), HeartbeatMessage(sender="m", data={}))


async def test_echo_handler_echoes() -> None:
    dispatcher = Dispatcher()
    dispatcher.register_handler("game_update", echo_handler)
    dispatcher.register_handler("heartbeat", echo_handler)
    websocket = MockWebSocket()
    games = {
        "games": [{"game_id": 1, "team_a": "A", "team_b": "B", "event_start_date": "2024-09-08"}]
    }
    await dispatcher.dispatch(websocket, GameUpdateMessage(sender="v", data=games))
    await dispatcher.dispatch(websocket, HeartbeatMessage(sender="v", data={"seq": 3}))
    first, second = websocket.sent
    assert isinstance(first, GameUpdateMessage)
    assert first.data == games
    assert isinstance(second, HeartbeatMessage)
    assert second.data == {"seq": 3}


# --------------------------------------------------------------------------- send_json


async def test_seed_flat_dict_becomes_a_typed_message() -> None:
    websocket = MockWebSocket(hotkey="my_hotkey")
    await websocket.send_json({"type": "confirmation", "status": "error", "message": "bad odds"})
    (reply,) = websocket.sent
    assert isinstance(reply, ConfirmationMessage)
    assert reply.sender == "my_hotkey"
    assert reply.data == {"status": "error", "message": "bad odds"}
    assert reply.confirmation.prediction_id is None
    assert reply.nonce and reply.timestamp


async def test_seed_success_reply() -> None:
    websocket = MockWebSocket()
    await websocket.send_json({"type": "confirmation", "status": "success", "prediction_id": "p1"})
    (reply,) = websocket.sent
    assert isinstance(reply, ConfirmationMessage)
    assert reply.data == {"status": "success", "prediction_id": "p1"}


async def test_full_envelope_keeps_its_data() -> None:
    websocket = MockWebSocket(hotkey="my_hotkey")
    data = {"status": "success", "prediction_id": "p1", "timestamp": "2024-09-03T00:00:00+00:00"}
    await websocket.send_json(
        {
            "type": "confirmation",
            "sender": "someone",
            "data": data,
            "timestamp": "2024-09-03T00:00:00+00:00",
            "nonce": "n",
            "signature": None,
        }
    )
    (reply,) = websocket.sent
    assert isinstance(reply, ConfirmationMessage)
    assert reply.data == data
    assert reply.sender == "my_hotkey"


async def test_type_and_data_only_is_an_envelope() -> None:
    websocket = MockWebSocket()
    await websocket.send_json({"type": "heartbeat", "data": {"seq": 1}})
    assert websocket.sent[0].data == {"seq": 1}


async def test_flat_dict_with_a_data_key_among_others_stays_flat() -> None:
    websocket = MockWebSocket()
    await websocket.send_json({"type": "heartbeat", "data": {"seq": 1}, "seq": 2})
    assert websocket.sent[0].data == {"data": {"seq": 1}, "seq": 2}


async def test_send_message_records_the_message() -> None:
    websocket = MockWebSocket()
    message = prediction()
    await websocket.send_message(message)
    assert websocket.sent == [message]
    assert websocket.sent_json == [message.to_dict()]


async def test_send_json_of_a_message_object() -> None:
    websocket = MockWebSocket()
    message = prediction()
    await websocket.send_json(message)
    assert websocket.sent == [message]


async def test_send_json_refuses_a_malformed_reply() -> None:
    websocket = MockWebSocket()
    with pytest.raises(DecodeError, match=r"data\.status"):
        await websocket.send_json({"type": "confirmation", "status": "maybe"})
    with pytest.raises(DecodeError, match="unknown message type 'nope'"):
        await websocket.send_json({"type": "nope"})
    assert websocket.sent == []


def test_to_message_needs_a_typed_dict() -> None:
    with pytest.raises(TypeError):
        to_message(["confirmation"], "me")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        to_message({"status": "error"}, "me")


def test_to_message_uses_the_given_sender() -> None:
    message = to_message({"type": "error", "message": "x"}, "me")
    assert isinstance(message, ErrorMessage)
    assert message.sender == "me"
    assert message.message == "x"
    assert message.signature is None


async def test_mock_close_is_recorded() -> None:
    websocket = MockWebSocket()
    websocket.close(1008, "policy")
    assert websocket.closed == (1008, "policy")
