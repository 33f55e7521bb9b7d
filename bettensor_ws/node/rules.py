"""Bettensor's prediction rules, checked in a fixed order, each with its own reason.

Pure functions over plain values: the store supplies the game and the miner's
wagers so far today, and the caller decides what to do with the verdict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from ..protocol.replay import parse_timestamp

__all__ = [
    "DAILY_WAGER_LIMIT",
    "REASONS",
    "HEALABLE",
    "check_own_data",
    "check_prediction",
    "game_start",
    "means_stored",
    "prediction_day",
    "prediction_days",
    "prediction_id_of",
    "utc_day",
]

DAILY_WAGER_LIMIT = 1000.0

MISSING_DATA = "missing data"
BAD_WAGER = "wager must be a positive finite number"
DAILY_LIMIT = "daily wager limit of 1000 exceeded"
UNKNOWN_GAME = "game unknown"
GAME_STARTED = "game already started"
BAD_OUTCOME = "predicted_outcome must be team_a, team_b, or Tie where the game can tie"
BAD_ODDS = "odds for the predicted outcome missing or not positive"
BAD_CONFIDENCE = "confidence_score must be within [0, 1]"
REASONS = (
    MISSING_DATA,
    BAD_WAGER,
    DAILY_LIMIT,
    UNKNOWN_GAME,
    GAME_STARTED,
    BAD_OUTCOME,
    BAD_ODDS,
    BAD_CONFIDENCE,
)

_ALREADY_STORED = re.compile(r"Prediction .{1,200} already exists in database")


def means_stored(status: str, message: str) -> bool:
    """Whether an answer says the prediction is stored: a success, or the reference
    validator's refusal of a prediction id it already holds (``Prediction <id>
    already exists in database``), which is what a resend after a lost
    confirmation gets from it."""
    return status == "success" or _ALREADY_STORED.fullmatch(message) is not None


HEALABLE = frozenset({UNKNOWN_GAME})
"""Refusals that the same prediction may outgrow (the validator may learn the game
later): never recorded as final by the validator, kept pending by the miner."""

BACKDATE_TOLERANCE = timedelta(hours=24)
FUTURE_TOLERANCE = timedelta(minutes=5)

_REQUIRED = ("game_id", "predicted_outcome", "wager")


def prediction_id_of(data: Any) -> str | None:
    """The prediction's id, under the reference's key or the seed's ``id``."""
    if not isinstance(data, dict):
        return None
    value = data.get("prediction_id", data.get("id"))
    return value if isinstance(value, str) and value else None


def utc_day(moment: datetime) -> str:
    return moment.astimezone(UTC).date().isoformat()


def prediction_day(data: Any, received: datetime) -> str:
    """The UTC day a prediction's wager counts on, the same at miner and validator.

    It is the prediction's own ``prediction_date``, so a prediction made on day
    D and delivered after midnight (a validator down across it) still counts on
    D, as the miner counted it; clamped to between 24 h before and 5 min after
    receipt (``received``), so back-dating can reach at most yesterday's budget.
    Without a readable date, the day of receipt.
    """
    return prediction_days([data], received)[0]


_EPOCH = date(1970, 1, 1)


def prediction_days(items: Iterable[Any], received: datetime) -> list[str]:
    """:func:`prediction_day` of each item, for a whole group at once (the bounds
    and each day's text worked out once, not per prediction)."""
    low = (received - BACKDATE_TOLERANCE).timestamp()
    high = (received + FUTURE_TOLERANCE).timestamp()
    receipt_day = utc_day(received)
    names: dict[int, str] = {}
    days = []
    for data in items:
        raw = data.get("prediction_date") if isinstance(data, dict) else None
        if not isinstance(raw, str):
            days.append(receipt_day)
            continue
        try:
            stamp = parse_timestamp(raw)
        except (ValueError, OverflowError):
            days.append(receipt_day)
            continue
        number = int(min(max(stamp, low), high) // 86400)  # POSIX days: the UTC date
        name = names.get(number)
        if name is None:
            name = names[number] = (_EPOCH + timedelta(days=number)).isoformat()
        days.append(name)
    return days


def game_start(game: dict[str, Any]) -> float:
    """A game's start in epoch seconds; -inf when unreadable (an unreadable start
    time cannot be shown to be in the future: such a game counts as started)."""
    try:
        return parse_timestamp(str(game["event_start_date"]))
    except (ValueError, OverflowError):
        return -math.inf


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def check_own_data(data: dict[str, Any]) -> str | None:
    """The rules a prediction breaks on its own, game and day aside: what a miner
    checks before sending it (``missing data``, a wager that is not positive)."""
    if prediction_id_of(data) is None:
        return MISSING_DATA
    for key in _REQUIRED:
        value = data.get(key)
        if value is None or value == "":
            return MISSING_DATA
    wager = _number(data["wager"])
    if wager is None or not math.isfinite(wager) or wager <= 0:
        return BAD_WAGER
    return None


def check_prediction(
    data: dict[str, Any],
    *,
    game: dict[str, Any] | None,
    wagered_today: float,
    now: datetime,
    starts: float | None = None,
) -> str | None:
    """None when the prediction is acceptable, else the first rule it breaks.

    ``starts``: the game's start (epoch seconds), if the caller already parsed
    ``event_start_date``; a group commit reads it once per game, not per prediction.
    """
    reason = check_own_data(data)
    if reason is not None:
        return reason
    wager = float(data["wager"])
    if wagered_today + wager > DAILY_WAGER_LIMIT + 1e-9:
        return DAILY_LIMIT
    if game is None:
        return UNKNOWN_GAME
    if starts is None:
        starts = game_start(game)
    if starts <= now.timestamp():
        return GAME_STARTED
    outcome = str(data["predicted_outcome"]).strip().lower()
    odds_key = {
        str(game["team_a"]).lower(): "team_a_odds",
        str(game["team_b"]).lower(): "team_b_odds",
    }.get(outcome)
    if odds_key is None and outcome == "tie" and game.get("can_tie"):
        odds_key = "tie_odds"
    if odds_key is None:
        return BAD_OUTCOME
    odds = _number(game.get(odds_key))
    if odds is None or not math.isfinite(odds) or odds <= 0:
        return BAD_ODDS
    confidence = data.get("confidence_score")
    if confidence is not None:
        value = _number(confidence)
        if value is None or not 0.0 <= value <= 1.0:
            return BAD_CONFIDENCE
    return None
