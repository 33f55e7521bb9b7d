"""Small helpers several test modules share."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import trio


def count_tasks() -> int:
    """Every task alive in this run, found by walking the tree from the root task."""
    total = 0
    root = trio.lowlevel.current_root_task()
    assert root is not None, "count_tasks() runs inside trio.run"
    stack = [root]
    while stack:
        task = stack.pop()
        total += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return total


def make_game(
    n: int, *, prefix: str = "game", league: str = "Test League", starts_in: timedelta = timedelta(days=1)
) -> dict[str, Any]:
    """An upcoming game; every third can tie, favourites alternate sides."""
    now = datetime.now(UTC)
    can_tie = n % 3 == 0
    return {
        "game_id": f"{prefix}-{n}",
        "team_a": f"Home{n}",
        "team_b": f"Away{n}",
        "sport": "soccer" if can_tie else "basketball",
        "league": league,
        "create_date": now.isoformat(),
        "last_update_date": now.isoformat(),
        "event_start_date": (now + starts_in).isoformat(),
        "active": True,
        "outcome": "Unfinished",
        "team_a_odds": 1.5 if n % 2 == 0 else 2.5,
        "team_b_odds": 2.5 if n % 2 == 0 else 1.5,
        "tie_odds": 3.2 if can_tie else None,
        "can_tie": can_tie,
    }


def prediction_data(prediction_id: str = "p1") -> dict[str, Any]:
    """A small prediction payload that decodes (the runtime and protocol tests share it)."""
    return {
        "prediction_id": prediction_id,
        "game_id": "g1",
        "miner_uid": 7,
        "predicted_outcome": "Home",
        "predicted_odds": 1.8,
        "team_a": "A",
        "team_b": "B",
        "wager": 10.0,
    }


SIGNED_REFUSAL_KEYS = {"sender", "timestamp", "auth_nonce", "signature"}


def bare_refusal(answer: str | bytes | dict[str, Any], validator: str | None = None) -> dict[str, Any]:
    """The reference's two keys of a handshake refusal.

    Our validator adds ``sender``, ``timestamp``, ``auth_nonce`` (when the auth
    frame had one) and a ``signature`` over them all; checked here, then set
    aside, so a test compares what a reference miner reads.
    """
    from bettensor_ws.protocol.signing import verify_dict

    frame = answer if isinstance(answer, dict) else orjson.loads(answer)
    extra = set(frame) - {"status", "message"}
    if extra:
        assert extra <= SIGNED_REFUSAL_KEYS and {"sender", "signature"} <= extra, frame
        assert verify_dict(frame, "sender"), frame
        if validator is not None:
            assert frame["sender"] == validator
    return {k: frame[k] for k in ("status", "message") if k in frame}
