"""What the published reference code does that our own reference-format peer did not
(issue 13): each quirk read without noise or loss. Time is passed in; no clock."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from bettensor_ws.node import MinerNode
from bettensor_ws.node.feed import SimulatedFeed
from bettensor_ws.node.rules import means_stored
from bettensor_ws.protocol.codec import encode
from bettensor_ws.protocol.link import Answer, Ignore, Notice, Refuse, Role
from bettensor_ws.protocol.messages import (
    ConfirmationMessage,
    HeartbeatMessage,
    HeartbeatResponseMessage,
)
from bettensor_ws.protocol.payloads import wire_game
from bettensor_ws.protocol.signing import sign
from tests.test_protocol_link import MINER_KEY, T0, VALIDATOR_KEY, make, miner, validator

WALL = time.time()

# The fields the reference TeamGame (pydantic) requires, and their types.
REFERENCE_GAME = {
    "game_id": str, "team_a": str, "team_b": str, "sport": str, "league": str,
    "create_date": str, "last_update_date": str, "event_start_date": str, "active": bool,
    "outcome": str, "team_a_odds": float, "team_b_odds": float, "tie_odds": float, "can_tie": bool,
}


def parses_as_reference_game(game: dict[str, Any]) -> bool:
    for key, kind in REFERENCE_GAME.items():
        value = game.get(key)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return False
        elif not isinstance(value, kind):
            return False
    return True


def test_a_reference_miners_heartbeat_response_is_taken_silently() -> None:
    """1: the reference miner answers a heartbeat with ``heartbeat_response``: no error back."""
    ours = validator()
    frame = sign(HeartbeatResponseMessage(sender="", data={}), MINER_KEY)
    verdict = ours.receive(encode(frame), now=T0 + 1, wall=WALL)
    assert isinstance(verdict, Ignore)
    assert ours._stats.rejections == {}


@pytest.mark.parametrize("answer", [True, False], ids=["our-validator", "reference-validator"])
def test_the_miner_answers_heartbeats_only_where_an_answer_is_welcome(answer: bool) -> None:
    """1: the reference validator refuses any answer to its heartbeat: to it, silence."""
    ours = make(Role.MINER)
    ours.answer_heartbeats = answer
    beat = sign(HeartbeatMessage(sender="", data={}), VALIDATOR_KEY)
    verdict = ours.receive(encode(beat), now=T0 + 1, wall=WALL)
    assert isinstance(verdict, Answer if answer else Ignore)
    assert ours._stats.rejections == {}


def test_every_game_we_put_on_the_wire_parses_in_the_reference_model() -> None:
    """2: odds we lack go out as 0.0 (the reference's "no draw"); every required field is there."""
    feed = SimulatedFeed(60)
    games = feed.tick(0)
    assert all(parses_as_reference_game(g) for g in games)
    assert all(g["tie_odds"] == 0.0 for g in games if not g["can_tie"])
    bare = {"game_id": 7, "team_a": "A", "team_b": "B", "event_start_date": "2030-01-01T00:00:00+00:00",
            "tie_odds": None, "team_a_odds": None}
    wired = wire_game(bare)
    assert parses_as_reference_game(wired) and wired["tie_odds"] == 0.0 and wired["game_id"] == "7"


@pytest.mark.parametrize(
    ("status", "message", "stored"),
    [
        ("success", "Prediction accepted", True),
        ("error", "Prediction p-1 already exists in database", True),
        ("error", "prediction_id already used for another prediction", False),
        ("error", "Prediction p-1 already exists in database, and more", False),
        ("error", "game unknown", False),
    ],
)
def test_already_exists_means_stored(status: str, message: str, stored: bool) -> None:
    """3: the reference validator refuses a prediction it already holds; that is a confirmation."""
    assert means_stored(status, message) is stored


async def test_a_resend_answered_already_exists_ends_confirmed(tmp_path: Path) -> None:
    """3: a lost confirmation, the resend refused "already exists": confirmed at the miner."""
    validator_hotkey = VALIDATOR_KEY.ss58_address
    node = MinerNode(MINER_KEY, [(validator_hotkey, "ws://127.0.0.1:1/ws")], tmp_path / "miner.db")
    try:
        prediction = {
            "prediction_id": "p-1", "game_id": "g1", "miner_uid": "1", "predicted_outcome": "A",
            "wager": 1.0, "prediction_date": datetime.now(UTC).isoformat(), "team_a": "A", "team_b": "B",
        }
        await node.submit_predictions([prediction])
        answer = ConfirmationMessage(
            sender=validator_hotkey,
            data={"status": "error", "prediction_id": "p-1",
                  "message": "Prediction p-1 already exists in database"},
        )
        await node.handle_confirmation(SimpleNamespace(hotkey=validator_hotkey), answer)
        assert node.store.delivery("p-1", validator_hotkey) == ("confirmed", None)
    finally:
        node.close()


def test_a_reference_error_frame_is_read_as_unsigned_information() -> None:
    """5: ``{"type": "error", "message", "timestamp"}`` (no sender, data or nonce) from a
    reference validator: a Notice (logged), not a malformed frame, and proof of nothing."""
    ours = miner()
    raw = orjson.dumps({"type": "error", "message": "Invalid message signature or structure",
                        "timestamp": datetime.now(UTC).isoformat()}).decode()
    verdict = ours.receive(raw, now=T0 + 1, wall=WALL)
    assert verdict == Notice("Invalid message signature or structure")
    assert ours._stats.rejections == {}
    long = orjson.dumps({"type": "error", "message": "x" * 10_000}).decode()
    notice = ours.receive(long, now=T0 + 2, wall=WALL)
    assert isinstance(notice, Notice) and len(notice.text) <= 200
    # a validator takes no such frame from a miner: there it is malformed
    assert isinstance(validator().receive(raw, now=T0 + 1, wall=WALL), Refuse)
