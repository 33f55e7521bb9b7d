"""Bettensor's prediction rules (bettensor_ws.node.rules), table-driven, in the issue's order.

Each case is one row: a change to a valid prediction (or its game, or the
miner's wagers so far today) and the reason expected, or None for accepted.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from bettensor_ws.node.rules import (
    BAD_CONFIDENCE,
    BAD_ODDS,
    BAD_OUTCOME,
    BAD_WAGER,
    DAILY_LIMIT,
    DAILY_WAGER_LIMIT,
    GAME_STARTED,
    MISSING_DATA,
    REASONS,
    UNKNOWN_GAME,
    check_prediction,
    prediction_id_of,
    utc_day,
)
from bettensor_ws.node.store import ValidatorStore

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
MISSING = object()  # a key to delete


def game(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "game_id": "g1",
        "team_a": "Arsenal",
        "team_b": "Chelsea",
        "sport": "soccer",
        "league": "EPL",
        "create_date": "2024-05-01T00:00:00+00:00",
        "last_update_date": "2024-05-01T00:00:00+00:00",
        "event_start_date": (NOW + timedelta(hours=2)).isoformat(),
        "active": True,
        "outcome": "Unfinished",
        "team_a_odds": 1.8,
        "team_b_odds": 2.2,
        "tie_odds": 3.1,
        "can_tie": True,
    }
    return _apply(base, changes)


def prediction(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "prediction_id": "p1",
        "game_id": "g1",
        "miner_uid": "7",
        "prediction_date": NOW.isoformat(),
        "predicted_outcome": "Arsenal",
        "predicted_odds": 1.8,
        "team_a": "Arsenal",
        "team_b": "Chelsea",
        "wager": 10.0,
        "team_a_odds": 1.8,
        "team_b_odds": 2.2,
        "tie_odds": 3.1,
        "model_name": None,
        "confidence_score": None,
        "outcome": "Unfinished",
        "payout": 0.0,
    }
    return _apply(base, changes)


def _apply(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if value is MISSING:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def check(
    data: dict[str, Any],
    the_game: dict[str, Any] | None = MISSING,  # type: ignore[assignment]
    wagered_today: float = 0.0,
    now: datetime = NOW,
) -> str | None:
    return check_prediction(
        data,
        game=game() if the_game is MISSING else the_game,
        wagered_today=wagered_today,
        now=now,
    )


def test_reasons_are_distinct_and_in_the_issue_order() -> None:
    assert REASONS == (
        MISSING_DATA,
        BAD_WAGER,
        DAILY_LIMIT,
        UNKNOWN_GAME,
        GAME_STARTED,
        BAD_OUTCOME,
        BAD_ODDS,
        BAD_CONFIDENCE,
    )
    assert len(set(REASONS)) == len(REASONS)
    assert all(isinstance(r, str) and r for r in REASONS)
    assert DAILY_WAGER_LIMIT == 1000.0


def test_a_valid_prediction_passes() -> None:
    assert check(prediction()) is None


# One row per case: (prediction, game, wagered_today, now, expected reason).
CASES: list[Any] = [
    # -- 1. missing data ------------------------------------------------------------------
    pytest.param(prediction(prediction_id=MISSING), game(), 0.0, NOW, MISSING_DATA, id="missing-prediction_id"),
    pytest.param(prediction(prediction_id=""), game(), 0.0, NOW, MISSING_DATA, id="empty-prediction_id"),
    pytest.param(prediction(prediction_id=None), game(), 0.0, NOW, MISSING_DATA, id="null-prediction_id"),
    pytest.param(prediction(prediction_id=5), game(), 0.0, NOW, MISSING_DATA, id="non-string-prediction_id"),
    pytest.param(prediction(prediction_id=MISSING, id="p1"), game(), 0.0, NOW, None, id="seed-id-key-accepted"),
    pytest.param(prediction(prediction_id=MISSING, id=""), game(), 0.0, NOW, MISSING_DATA, id="empty-seed-id"),
    pytest.param(prediction(game_id=MISSING), game(), 0.0, NOW, MISSING_DATA, id="missing-game_id"),
    pytest.param(prediction(game_id=None), game(), 0.0, NOW, MISSING_DATA, id="null-game_id"),
    pytest.param(prediction(game_id=""), game(), 0.0, NOW, MISSING_DATA, id="empty-game_id"),
    pytest.param(
        prediction(predicted_outcome=MISSING), game(), 0.0, NOW, MISSING_DATA, id="missing-predicted_outcome"
    ),
    pytest.param(prediction(predicted_outcome=""), game(), 0.0, NOW, MISSING_DATA, id="empty-predicted_outcome"),
    pytest.param(prediction(wager=MISSING), game(), 0.0, NOW, MISSING_DATA, id="missing-wager"),
    pytest.param(prediction(wager=None), game(), 0.0, NOW, MISSING_DATA, id="null-wager"),
    # -- 2. wager not a positive finite number ----------------------------------------------
    pytest.param(prediction(wager=0), game(), 0.0, NOW, BAD_WAGER, id="wager-zero"),
    pytest.param(prediction(wager=0.0), game(), 0.0, NOW, BAD_WAGER, id="wager-zero-float"),
    pytest.param(prediction(wager=-1), game(), 0.0, NOW, BAD_WAGER, id="wager-negative"),
    pytest.param(prediction(wager="abc"), game(), 0.0, NOW, BAD_WAGER, id="wager-string"),
    pytest.param(prediction(wager="10"), game(), 0.0, NOW, BAD_WAGER, id="wager-numeric-string"),
    pytest.param(prediction(wager=True), game(), 0.0, NOW, BAD_WAGER, id="wager-bool"),
    pytest.param(prediction(wager=math.inf), game(), 0.0, NOW, BAD_WAGER, id="wager-inf"),
    pytest.param(prediction(wager=-math.inf), game(), 0.0, NOW, BAD_WAGER, id="wager-minus-inf"),
    pytest.param(prediction(wager=math.nan), game(), 0.0, NOW, BAD_WAGER, id="wager-nan"),
    pytest.param(prediction(wager=[10]), game(), 0.0, NOW, BAD_WAGER, id="wager-list"),
    pytest.param(prediction(wager=1), game(), 0.0, NOW, None, id="wager-int-accepted"),
    pytest.param(prediction(wager=0.01), game(), 0.0, NOW, None, id="wager-small-accepted"),
    # -- 3. daily wager limit ----------------------------------------------------------------
    pytest.param(prediction(wager=1000), game(), 0.0, NOW, None, id="limit-exactly-1000-at-once"),
    pytest.param(prediction(wager=10.0), game(), 990.0, NOW, None, id="limit-total-exactly-1000"),
    pytest.param(prediction(wager=1000.01), game(), 0.0, NOW, DAILY_LIMIT, id="limit-1000.01-at-once"),
    pytest.param(prediction(wager=10.01), game(), 990.0, NOW, DAILY_LIMIT, id="limit-total-1000.01"),
    pytest.param(prediction(wager=0.01), game(), 1000.0, NOW, DAILY_LIMIT, id="limit-already-reached"),
    # -- 4. game unknown ----------------------------------------------------------------------
    pytest.param(prediction(), None, 0.0, NOW, UNKNOWN_GAME, id="game-unknown"),
    # -- 5. game already started --------------------------------------------------------------
    pytest.param(
        prediction(), game(event_start_date=NOW.isoformat()), 0.0, NOW, GAME_STARTED, id="started-exactly-now"
    ),
    pytest.param(
        prediction(),
        game(event_start_date=(NOW - timedelta(days=1)).isoformat()),
        0.0,
        NOW,
        GAME_STARTED,
        id="started-in-the-past",
    ),
    pytest.param(
        prediction(),
        game(event_start_date=(NOW + timedelta(seconds=1)).isoformat()),
        0.0,
        NOW,
        None,
        id="starts-in-one-second",
    ),
    pytest.param(
        prediction(),
        game(event_start_date="2024-06-01T11:00:00"),
        0.0,
        NOW,
        GAME_STARTED,
        id="started-naive-start-is-utc",
    ),
    pytest.param(
        prediction(),
        game(event_start_date="2024-06-01T14:30:00+02:00"),
        0.0,
        NOW,
        None,
        id="start-with-offset-still-ahead",
    ),
    pytest.param(
        prediction(), game(event_start_date="not a date"), 0.0, NOW, GAME_STARTED, id="unreadable-start"
    ),
    # -- 6. predicted_outcome -----------------------------------------------------------------
    pytest.param(prediction(predicted_outcome="Arsenal"), game(), 0.0, NOW, None, id="outcome-team_a"),
    pytest.param(prediction(predicted_outcome="arsenal"), game(), 0.0, NOW, None, id="outcome-team_a-lower"),
    pytest.param(prediction(predicted_outcome="ARSENAL"), game(), 0.0, NOW, None, id="outcome-team_a-upper"),
    pytest.param(prediction(predicted_outcome="Chelsea"), game(), 0.0, NOW, None, id="outcome-team_b"),
    pytest.param(prediction(predicted_outcome="cHeLsEa"), game(), 0.0, NOW, None, id="outcome-team_b-mixed"),
    pytest.param(prediction(predicted_outcome="Tie"), game(), 0.0, NOW, None, id="outcome-Tie-can-tie"),
    pytest.param(prediction(predicted_outcome="tie"), game(), 0.0, NOW, None, id="outcome-tie-can-tie"),
    pytest.param(prediction(predicted_outcome="TIE"), game(), 0.0, NOW, None, id="outcome-TIE-can-tie"),
    pytest.param(
        prediction(predicted_outcome="Tie"), game(can_tie=False), 0.0, NOW, BAD_OUTCOME, id="outcome-Tie-no-tie"
    ),
    pytest.param(
        prediction(predicted_outcome="tie"), game(can_tie=False), 0.0, NOW, BAD_OUTCOME, id="outcome-tie-no-tie"
    ),
    pytest.param(
        prediction(predicted_outcome="TIE"), game(can_tie=False), 0.0, NOW, BAD_OUTCOME, id="outcome-TIE-no-tie"
    ),
    pytest.param(prediction(predicted_outcome="Liverpool"), game(), 0.0, NOW, BAD_OUTCOME, id="outcome-other-team"),
    pytest.param(prediction(predicted_outcome="Home"), game(), 0.0, NOW, BAD_OUTCOME, id="outcome-seed-Home"),
    pytest.param(prediction(predicted_outcome="Draw"), game(), 0.0, NOW, BAD_OUTCOME, id="outcome-Draw"),
    pytest.param(prediction(predicted_outcome="team_a"), game(), 0.0, NOW, BAD_OUTCOME, id="outcome-literal-team_a"),
    pytest.param(prediction(predicted_outcome="Arsenal FC"), game(), 0.0, NOW, BAD_OUTCOME, id="outcome-near-name"),
    # -- 7. odds for the predicted outcome ----------------------------------------------------
    pytest.param(prediction(), game(team_a_odds=None), 0.0, NOW, BAD_ODDS, id="odds-team_a-missing"),
    pytest.param(prediction(), game(team_a_odds=0.0), 0.0, NOW, BAD_ODDS, id="odds-team_a-zero"),
    pytest.param(prediction(), game(team_a_odds=-1.5), 0.0, NOW, BAD_ODDS, id="odds-team_a-negative"),
    pytest.param(
        prediction(predicted_outcome="Chelsea"), game(team_b_odds=None), 0.0, NOW, BAD_ODDS, id="odds-team_b-missing"
    ),
    pytest.param(
        prediction(predicted_outcome="Chelsea"), game(team_b_odds=0), 0.0, NOW, BAD_ODDS, id="odds-team_b-zero"
    ),
    pytest.param(
        prediction(predicted_outcome="Chelsea"), game(team_b_odds=-2.0), 0.0, NOW, BAD_ODDS, id="odds-team_b-negative"
    ),
    pytest.param(
        prediction(predicted_outcome="Tie"), game(tie_odds=None), 0.0, NOW, BAD_ODDS, id="odds-tie-missing"
    ),
    pytest.param(prediction(predicted_outcome="Tie"), game(tie_odds=0.0), 0.0, NOW, BAD_ODDS, id="odds-tie-zero"),
    pytest.param(
        prediction(predicted_outcome="Tie"), game(tie_odds=-3.0), 0.0, NOW, BAD_ODDS, id="odds-tie-negative"
    ),
    pytest.param(
        prediction(predicted_outcome="Chelsea"), game(team_a_odds=None), 0.0, NOW, None, id="odds-other-team-missing-ok"
    ),
    pytest.param(prediction(), game(tie_odds=None), 0.0, NOW, None, id="odds-tie-missing-irrelevant"),
    # -- 8. confidence_score within [0, 1] ----------------------------------------------------
    pytest.param(prediction(confidence_score=None), game(), 0.0, NOW, None, id="confidence-none"),
    pytest.param(prediction(confidence_score=MISSING), game(), 0.0, NOW, None, id="confidence-absent"),
    pytest.param(prediction(confidence_score=0), game(), 0.0, NOW, None, id="confidence-0"),
    pytest.param(prediction(confidence_score=0.5), game(), 0.0, NOW, None, id="confidence-half"),
    pytest.param(prediction(confidence_score=1.0), game(), 0.0, NOW, None, id="confidence-1"),
    pytest.param(prediction(confidence_score=-0.01), game(), 0.0, NOW, BAD_CONFIDENCE, id="confidence-negative"),
    pytest.param(prediction(confidence_score=1.01), game(), 0.0, NOW, BAD_CONFIDENCE, id="confidence-above-1"),
    pytest.param(prediction(confidence_score=math.nan), game(), 0.0, NOW, BAD_CONFIDENCE, id="confidence-nan"),
    pytest.param(prediction(confidence_score="0.5"), game(), 0.0, NOW, BAD_CONFIDENCE, id="confidence-string"),
]


@pytest.mark.parametrize(("data", "the_game", "wagered_today", "now", "expected"), CASES)
def test_rule(
    data: dict[str, Any], the_game: dict[str, Any] | None, wagered_today: float, now: datetime, expected: str | None
) -> None:
    assert check(data, the_game, wagered_today, now) == expected


@pytest.mark.parametrize(("data", "the_game", "wagered_today", "now", "expected"), CASES)
def test_rule_through_the_validator_store(
    tmp_path: Path,
    data: dict[str, Any],
    the_game: dict[str, Any] | None,
    wagered_today: float,
    now: datetime,
    expected: str | None,
) -> None:
    """The same table through ValidatorStore.submit: games and the day's wagers read back from SQLite."""
    store = ValidatorStore(tmp_path / "v.db")
    try:
        if the_game is not None:
            store.upsert_games([the_game])
        if wagered_today:
            store.db.execute(
                "INSERT INTO predictions (prediction_id, miner_hotkey, game_id, wager, predicted_outcome, "
                "body, received_at, day) VALUES ('earlier', 'miner', 'g1', ?, 'Arsenal', '{}', ?, ?)",
                (wagered_today, now.isoformat(), utc_day(now)),
            )
        result = store.submit("miner", [data], now=now)[0]
        assert result["prediction_id"] == (prediction_id_of(data) or "")  # "": no usable id
        if expected is None:
            assert (result["status"], result["message"]) == ("success", ValidatorStore.ACCEPTED)
            assert prediction_id_of(data) in store.prediction_ids()
        else:
            assert (result["status"], result["message"]) == ("error", expected)
            assert store.prediction_ids() <= {"earlier"}
    finally:
        store.close()


def test_each_rule_has_a_case() -> None:
    expected = {param.values[-1] for param in CASES}
    assert set(REASONS) <= expected


# ---- order: a prediction breaking several rules gets the earliest reason ----------------------

STARTED = game(event_start_date=(NOW - timedelta(hours=1)).isoformat())

ORDER: list[Any] = [
    pytest.param(
        prediction(prediction_id=MISSING, wager=-1, predicted_outcome="Nobody", confidence_score=7),
        None,
        5000.0,
        MISSING_DATA,
        id="missing-beats-everything",
    ),
    pytest.param(prediction(wager="abc", predicted_outcome="Nobody"), None, 5000.0, BAD_WAGER, id="wager-beats-limit"),
    pytest.param(prediction(wager=10.0, predicted_outcome="Nobody"), None, 995.0, DAILY_LIMIT, id="limit-beats-unknown"),
    pytest.param(
        prediction(predicted_outcome="Nobody", confidence_score=7), None, 0.0, UNKNOWN_GAME, id="unknown-beats-outcome"
    ),
    pytest.param(
        prediction(predicted_outcome="Nobody", confidence_score=7), STARTED, 0.0, GAME_STARTED, id="started-beats-outcome"
    ),
    pytest.param(
        prediction(predicted_outcome="Tie", confidence_score=7),
        game(can_tie=False, tie_odds=None),
        0.0,
        BAD_OUTCOME,
        id="outcome-beats-odds",
    ),
    pytest.param(
        prediction(confidence_score=7), game(team_a_odds=0.0), 0.0, BAD_ODDS, id="odds-beat-confidence"
    ),
]


@pytest.mark.parametrize(("data", "the_game", "wagered_today", "expected"), ORDER)
def test_rule_order(
    data: dict[str, Any], the_game: dict[str, Any] | None, wagered_today: float, expected: str
) -> None:
    assert check(data, the_game, wagered_today) == expected


def test_rules_are_checked_in_order_removing_one_fault_at_a_time() -> None:
    """Start from a prediction breaking every rule; fix the earliest fault each step."""
    data = prediction(prediction_id=MISSING, wager=-1, predicted_outcome="Nobody", confidence_score=2.0)
    state: dict[str, Any] = {"game": None, "wagered": 999.5}

    def fix(reason: str) -> None:
        if reason == MISSING_DATA:
            data["prediction_id"] = "p1"
        elif reason == BAD_WAGER:
            data["wager"] = 1.0
        elif reason == DAILY_LIMIT:
            state["wagered"] = 0.0
        elif reason == UNKNOWN_GAME:
            state["game"] = game(event_start_date=NOW.isoformat(), team_a_odds=None)
        elif reason == GAME_STARTED:
            state["game"]["event_start_date"] = (NOW + timedelta(minutes=5)).isoformat()
        elif reason == BAD_OUTCOME:
            data["predicted_outcome"] = "Arsenal"
        elif reason == BAD_ODDS:
            state["game"]["team_a_odds"] = 1.5
        elif reason == BAD_CONFIDENCE:
            data["confidence_score"] = 0.9

    seen = []
    while (got := check_prediction(data, game=state["game"], wagered_today=state["wagered"], now=NOW)) is not None:
        seen.append(got)
        fix(got)
        assert len(seen) <= len(REASONS)
    assert seen == list(REASONS)


def test_daily_limit_counts_per_utc_day_of_the_prediction(tmp_path: Path) -> None:
    """Exactly 1000 in a UTC day is allowed, 0.01 more is not; the next UTC day starts afresh.
    The day is the prediction's own date (here: made and received at the same moment)."""
    store = ValidatorStore(tmp_path / "v.db")
    try:
        store.upsert_games([game(event_start_date="2024-06-03T00:00:00+00:00")])
        late = datetime(2024, 6, 1, 23, 59, 59, tzinfo=UTC)
        assert store.submit("m", [prediction(prediction_id="a", wager=600.0, prediction_date=late.isoformat())], now=late)[0]["status"] == "success"
        assert store.submit("m", [prediction(prediction_id="b", wager=400.0, prediction_date=late.isoformat())], now=late)[0]["status"] == "success"
        refused = store.submit("m", [prediction(prediction_id="c", wager=0.01, prediction_date=late.isoformat())], now=late)[0]
        assert (refused["status"], refused["message"]) == ("error", DAILY_LIMIT)
        # another miner has its own limit
        assert store.submit("other", [prediction(prediction_id="d", wager=1000.0, prediction_date=late.isoformat())], now=late)[0]["status"] == "success"
        # a second after midnight UTC is a new day (even though it is still June 1st at UTC-5)
        after = datetime(2024, 6, 1, 19, 0, 1, tzinfo=timezone(timedelta(hours=-5)))
        assert utc_day(after) == "2024-06-02"
        fresh = store.submit("m", [prediction(prediction_id="f", wager=1000.0, prediction_date=after.isoformat())], now=after)[0]
        assert (fresh["status"], fresh["message"]) == ("success", "Prediction accepted")
        over = store.submit("m", [prediction(prediction_id="e", wager=0.01, prediction_date=after.isoformat())], now=after)[0]
        assert over["message"] == DAILY_LIMIT
    finally:
        store.close()


# ---- the UTC day of receipt -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "day"),
    [
        pytest.param(datetime(2024, 6, 1, 0, 0, tzinfo=UTC), "2024-06-01", id="midnight-utc"),
        pytest.param(datetime(2024, 6, 1, 23, 59, 59, tzinfo=UTC), "2024-06-01", id="last-second"),
        pytest.param(
            datetime(2024, 6, 2, 1, 0, tzinfo=timezone(timedelta(hours=2))),
            "2024-06-01",
            id="offset-converted-to-utc",
        ),
    ],
)
def test_utc_day(moment: datetime, day: str) -> None:
    assert utc_day(moment) == day


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param({"prediction_id": "a"}, "a", id="prediction_id"),
        pytest.param({"id": "b"}, "b", id="seed-id"),
        pytest.param({"prediction_id": "a", "id": "b"}, "a", id="prediction_id-wins"),
        pytest.param({}, None, id="none"),
        pytest.param({"prediction_id": 3}, None, id="not-a-string"),
    ],
)
def test_prediction_id_of(data: dict[str, Any], expected: str | None) -> None:
    assert prediction_id_of(data) == expected
