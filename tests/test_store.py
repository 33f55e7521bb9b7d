"""The SQLite stores (bettensor_ws.node.store): durability settings, schema versions, idempotency.

ValidatorStore is what the validator's prediction handler runs (validate, store,
confirm); MinerStore keeps a miner's predictions and their delivery state per
validator. Both are synchronous; the nodes drive them from one worker thread.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bettensor_ws.node.dbthread import DbThread
from bettensor_ws.node.rules import (
    BAD_OUTCOME,
    BAD_WAGER,
    DAILY_LIMIT,
    GAME_STARTED,
    HEALABLE,
    MISSING_DATA,
    UNKNOWN_GAME,
)
from bettensor_ws.node.store import MinerStore, ValidatorStore, canonical

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
ACCEPTED = ValidatorStore.ACCEPTED
REUSED = "prediction_id already used for another prediction"


def game(game_id: str = "g1", *, starts: datetime | None = None, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "game_id": game_id,
        "team_a": "Arsenal",
        "team_b": "Chelsea",
        "sport": "soccer",
        "league": "EPL",
        "create_date": "2024-05-01T00:00:00+00:00",
        "last_update_date": "2024-05-01T00:00:00+00:00",
        "event_start_date": (starts or NOW + timedelta(hours=2)).isoformat(),
        "active": True,
        "outcome": "Unfinished",
        "team_a_odds": 1.8,
        "team_b_odds": 2.2,
        "tie_odds": 3.1,
        "can_tie": True,
    }
    base.update(changes)
    return base


def prediction(prediction_id: str = "p1", game_id: str = "g1", **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "prediction_id": prediction_id,
        "game_id": game_id,
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
    base.update(changes)
    return base


def answer(result: dict[str, Any]) -> tuple[Any, str, str]:
    return result["prediction_id"], result["status"], result["message"]


@pytest.fixture
def mstore(tmp_path: Path) -> Any:
    store = MinerStore(tmp_path / "miner.db")
    yield store
    store.close()


def columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


# ---- durability settings and schema ------------------------------------------------------------


@pytest.mark.parametrize("kind", [ValidatorStore, MinerStore], ids=["validator", "miner"])
def test_wal_synchronous_full_and_current_version(tmp_path: Path, kind: Any) -> None:
    store = kind(tmp_path / "x.db")
    try:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(kind.migrations)
        assert store.version == len(kind.migrations)
        assert {"prediction_id"} <= columns(store.db, "predictions")
        assert {"game_id", "team_a", "team_b", "event_start_date", "can_tie"} <= columns(store.db, "games")
    finally:
        store.close()
    # WAL is a property of the file: a plain connection sees it too
    plain = sqlite3.connect(tmp_path / "x.db")
    try:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        plain.close()


def test_validator_schema(vstore: ValidatorStore) -> None:
    assert vstore.version == len(ValidatorStore.migrations) == 5
    assert {
        "prediction_id",
        "miner_hotkey",
        "game_id",
        "wager",
        "predicted_outcome",
        "body",
        "received_at",
        "day",
        "status",
        "message",
    } <= columns(vstore.db, "predictions")
    assert {"prediction_id", "miner_hotkey", "body", "message"} <= columns(vstore.db, "rejections")


def test_miner_schema(mstore: MinerStore) -> None:
    assert {"prediction_id", "game_id", "body", "created_at"} <= columns(mstore.db, "predictions")
    assert {"prediction_id", "validator_hotkey", "state", "reason"} <= columns(mstore.db, "deliveries")


def test_reopening_keeps_data_and_version(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    store = ValidatorStore(path)
    store.upsert_games([game()])
    store.submit("miner", [prediction("p1")], now=NOW)
    store.close()
    again = ValidatorStore(path)
    try:
        assert again.version == len(ValidatorStore.migrations)
        assert again.prediction_ids() == {"p1"}
        assert again.game("g1") is not None
    finally:
        again.close()


def test_migration_from_version_1(tmp_path: Path) -> None:
    """A database written by the v1 schema opens, migrates, and keeps its rows, filled in."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    for statement in ValidatorStore.migrations[0]:
        old.execute(statement)
    old.execute("PRAGMA user_version=1")
    body = prediction("old-1", wager=995.0)
    old.execute(
        "INSERT INTO predictions (prediction_id, miner_hotkey, game_id, wager, predicted_outcome, "
        "body, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ("old-1", "miner", "g1", 995.0, "Arsenal", canonical(body), NOW.isoformat()),
    )
    old.commit()
    old.close()

    store = ValidatorStore(path)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(ValidatorStore.migrations)
        row = store.prediction("old-1")
        assert row is not None
        assert row["miner_hotkey"] == "miner"
        assert row["status"] == "success"
        assert row["message"] == ACCEPTED
        assert row["day"] == "2024-06-01"
        assert row["received_at"] == NOW.isoformat()
        # the migrated row is an ordinary stored prediction: idempotent and counted for the day
        store.upsert_games([game()])
        assert answer(store.submit("miner", [body], now=NOW)[0]) == ("old-1", "success", ACCEPTED)
        refused = store.submit("miner", [prediction("new", wager=10.0)], now=NOW)[0]
        assert refused["message"] == DAILY_LIMIT
        assert answer(store.submit("miner", [prediction("new2", wager=5.0)], now=NOW)[0])[1] == "success"
    finally:
        store.close()


@pytest.mark.parametrize("version", range(1, len(ValidatorStore.migrations)))
def test_migration_from_every_older_version(tmp_path: Path, version: int) -> None:
    """Any older validator schema migrates to exactly what a fresh database gets."""
    kind = ValidatorStore
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    for step in kind.migrations[:version]:
        for statement in step:
            old.execute(statement)
    old.execute(f"PRAGMA user_version={version}")
    old.commit()
    old.close()
    store = kind(path)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(kind.migrations)
        fresh = kind(tmp_path / "fresh.db")
        try:
            def schema(db: sqlite3.Connection) -> dict[str, set[str]]:
                tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
                return {t: columns(db, t) for t in tables}

            assert schema(store.db) == schema(fresh.db)
        finally:
            fresh.close()
    finally:
        store.close()


def test_migration_is_atomic_and_rerunnable(tmp_path: Path) -> None:
    """Opening twice runs no migration twice (ALTER TABLE ADD COLUMN would fail)."""
    path = tmp_path / "v.db"
    ValidatorStore(path).close()
    ValidatorStore(path).close()
    store = ValidatorStore(path)
    try:
        assert store.version == len(ValidatorStore.migrations)
    finally:
        store.close()


@pytest.mark.parametrize("kind", [ValidatorStore, MinerStore], ids=["validator", "miner"])
def test_newer_database_is_refused(tmp_path: Path, kind: Any) -> None:
    path = tmp_path / "future.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={len(kind.migrations) + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer than this program"):
        kind(path)
    # and the file is left as it was
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(kind.migrations) + 1
    finally:
        db.close()


# ---- games -------------------------------------------------------------------------------------


def test_upsert_games_reports_new_and_changed_only(mstore: MinerStore) -> None:
    assert mstore.upsert_games([game("g1"), game("g2")]) == ["g1", "g2"]
    assert mstore.upsert_games([game("g1"), game("g2")]) == []
    assert mstore.upsert_games([game("g1", team_a_odds=1.7), game("g2")]) == ["g1"]
    assert mstore.game("g1")["team_a_odds"] == 1.7  # type: ignore[index]
    assert mstore.game("nope") is None
    assert [g["game_id"] for g in mstore.games()] == ["g1", "g2"]
    stored = mstore.game("g2")
    assert stored is not None and stored["can_tie"] is True and stored["active"] is True


def test_upcoming_games_filters_started_and_inactive(mstore: MinerStore) -> None:
    mstore.upsert_games(
        [
            game("future", starts=NOW + timedelta(hours=1)),
            game("now", starts=NOW),
            game("past", starts=NOW - timedelta(hours=1)),
            game("inactive", starts=NOW + timedelta(hours=1), active=False),
            game("naive-future", event_start_date="2024-06-01T13:00:00"),
            game("naive-past", event_start_date="2024-06-01T11:00:00"),
            game("garbage", event_start_date="soon"),
        ]
    )
    upcoming = [g["game_id"] for g in mstore.upcoming_games(NOW)]
    assert upcoming == ["future", "naive-future"]


# ---- ValidatorStore.submit -----------------------------------------------------------------------


def test_submit_accepts_and_stores(vstore: ValidatorStore) -> None:
    results = vstore.submit("miner", [prediction("p1")], now=NOW)
    assert [answer(r) for r in results] == [("p1", "success", ACCEPTED)]
    row = vstore.prediction("p1")
    assert row is not None
    assert row["miner_hotkey"] == "miner"
    assert row["game_id"] == "g1"
    assert row["wager"] == 10.0
    assert row["predicted_outcome"] == "Arsenal"
    assert json.loads(row["body"]) == prediction("p1")
    assert row["day"] == "2024-06-01"
    assert vstore.count_predictions() == 1
    assert vstore.per_miner() == [("miner", 1, 10.0)]


def test_submit_batch_answers_each_in_order(vstore: ValidatorStore) -> None:
    batch = [
        prediction("a"),
        prediction("b", game_id="nope"),
        prediction("c", wager=-1),
        {"game_id": "g1"},
        prediction("d", game_id="g2", predicted_outcome="tie"),
        prediction("e", predicted_outcome="chelsea"),
    ]
    results = vstore.submit("miner", batch, now=NOW)
    assert [answer(r) for r in results] == [
        ("a", "success", ACCEPTED),
        ("b", "error", UNKNOWN_GAME),
        ("c", "error", BAD_WAGER),
        ("", "error", MISSING_DATA),
        ("d", "error", BAD_OUTCOME),
        ("e", "success", ACCEPTED),
    ]
    assert vstore.prediction_ids() == {"a", "e"}


def test_idempotent_resend_same_answer_stored_once(vstore: ValidatorStore) -> None:
    first = vstore.submit("miner", [prediction("p1", wager=600.0)], now=NOW)
    again = vstore.submit("miner", [prediction("p1", wager=600.0)], now=NOW + timedelta(minutes=1))
    assert first == again
    assert vstore.count_predictions() == 1
    # the wager counted once: 400 more is still within the day's limit
    assert vstore.submit("miner", [prediction("p2", wager=400.0)], now=NOW)[0]["status"] == "success"


def test_idempotency_compares_key_sorted_content(vstore: ValidatorStore) -> None:
    data = prediction("p1")
    vstore.submit("miner", [data], now=NOW)
    shuffled = dict(reversed(list(data.items())))
    assert list(shuffled) != list(data)
    assert answer(vstore.submit("miner", [shuffled], now=NOW)[0]) == ("p1", "success", ACCEPTED)
    assert vstore.count_predictions() == 1


def test_resend_answered_as_before_even_if_rules_would_now_refuse(vstore: ValidatorStore) -> None:
    vstore.submit("miner", [prediction("p1", wager=1000.0)], now=NOW)
    # the game has since started, the day's limit is used up, and the game is gone from the feed
    later = NOW + timedelta(hours=3)
    assert answer(vstore.submit("miner", [prediction("p1", wager=1000.0)], now=later)[0]) == (
        "p1",
        "success",
        ACCEPTED,
    )
    vstore.db.execute("DELETE FROM games")
    assert answer(vstore.submit("miner", [prediction("p1", wager=1000.0)], now=later)[0]) == (
        "p1",
        "success",
        ACCEPTED,
    )
    assert vstore.count_predictions() == 1


def test_same_id_with_other_content_is_an_error_and_ids_are_per_miner(vstore: ValidatorStore) -> None:
    vstore.submit("miner", [prediction("p1")], now=NOW)
    other_content = vstore.submit("miner", [prediction("p1", wager=11.0)], now=NOW)[0]
    assert answer(other_content) == ("p1", "error", REUSED)
    # another miner's "p1" is its own prediction, and changes nothing of the first
    other_miner = vstore.submit("thief", [prediction("p1", wager=3.0)], now=NOW)[0]
    assert answer(other_miner) == ("p1", "success", ACCEPTED)
    row = vstore.prediction("p1", "miner")
    assert row is not None and row["miner_hotkey"] == "miner" and row["wager"] == 10.0
    theirs = vstore.prediction("p1", "thief")
    assert theirs is not None and theirs["wager"] == 3.0
    assert vstore.count_predictions() == 2


def test_refusal_is_answered_the_same_on_resend(vstore: ValidatorStore) -> None:
    """A resent refused prediction gets its first answer, though the rules would now differ."""
    vstore.upsert_games([game("g2", starts=NOW + timedelta(minutes=30))])
    refused = prediction("late", "g2", predicted_outcome="Spurs", wager=500.0)
    assert answer(vstore.submit("miner", [refused], now=NOW)[0]) == ("late", "error", BAD_OUTCOME)
    # now the day's limit would refuse it first, and later still the game has started
    assert vstore.submit("miner", [prediction("big", wager=600.0)], now=NOW)[0]["status"] == "success"
    assert answer(vstore.submit("miner", [refused], now=NOW)[0]) == ("late", "error", BAD_OUTCOME)
    later = NOW + timedelta(hours=1)
    assert answer(vstore.submit("miner", [refused], now=later)[0]) == ("late", "error", BAD_OUTCOME)
    # its id is taken: other content is an error, and nothing is stored
    assert answer(vstore.submit("miner", [prediction("late", wager=1.0)], now=NOW)[0]) == ("late", "error", REUSED)
    assert vstore.prediction_ids() == {"big"}
    # another miner's "late" is judged on its own
    assert answer(vstore.submit("thief", [refused], now=NOW)[0]) == ("late", "error", BAD_OUTCOME)


def test_a_refusal_that_can_heal_is_not_final(vstore: ValidatorStore) -> None:
    """'game unknown' is not recorded: once the validator knows the game, a resend is accepted."""
    refused = prediction("early", "nope")
    assert answer(vstore.submit("miner", [refused], now=NOW)[0]) == ("early", "error", UNKNOWN_GAME)
    assert vstore.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 0
    vstore.upsert_games([game("nope")])
    assert answer(vstore.submit("miner", [refused], now=NOW)[0]) == ("early", "success", ACCEPTED)


def test_duplicate_within_one_batch(vstore: ValidatorStore) -> None:
    results = vstore.submit(
        "miner", [prediction("p1"), prediction("p1"), prediction("p1", wager=3.0)], now=NOW
    )
    assert [answer(r) for r in results] == [
        ("p1", "success", ACCEPTED),
        ("p1", "success", ACCEPTED),
        ("p1", "error", REUSED),
    ]
    assert vstore.count_predictions() == 1


def test_daily_limit_counts_stored_wagers(vstore: ValidatorStore) -> None:
    results = vstore.submit(
        "miner",
        [prediction("a", wager=400.0), prediction("b", wager=500.0), prediction("c", wager=100.01)],
        now=NOW,
    )
    assert [r["status"] for r in results] == ["success", "success", "error"]
    assert results[2]["message"] == DAILY_LIMIT
    # refused predictions do not count: exactly 100 more makes 1000
    assert vstore.submit("miner", [prediction("d", wager=100.0)], now=NOW)[0]["status"] == "success"
    assert vstore.submit("miner", [prediction("e", wager=0.01)], now=NOW)[0]["message"] == DAILY_LIMIT
    # another miner, and the next UTC day, have their own limits
    assert vstore.submit("other", [prediction("f", wager=1000.0)], now=NOW)[0]["status"] == "success"
    tomorrow = NOW + timedelta(days=1)
    vstore.upsert_games([game("g3", starts=tomorrow + timedelta(hours=1))])
    dated_tomorrow = prediction("g", "g3", wager=1000.0, prediction_date=tomorrow.isoformat())
    assert vstore.submit("miner", [dated_tomorrow], now=tomorrow)[0]["status"] == "success"
    assert vstore.per_miner() == [("miner", 4, 2000.0), ("other", 1, 1000.0)]


def test_started_game_refused(vstore: ValidatorStore) -> None:
    vstore.upsert_games([game("old", starts=NOW - timedelta(minutes=1))])
    result = vstore.submit("miner", [prediction("p1", "old")], now=NOW)[0]
    assert answer(result) == ("p1", "error", GAME_STARTED)
    assert vstore.count_predictions() == 0


def test_failed_submit_rolls_back(vstore: ValidatorStore) -> None:
    class Boom(dict[str, Any]):
        def get(self, key: str, default: Any = None) -> Any:
            if key == "game_id":
                raise RuntimeError("boom")
            return super().get(key, default)

    with pytest.raises(RuntimeError):
        vstore.submit("miner", [prediction("a"), Boom(prediction("b"))], now=NOW)
    assert vstore.count_predictions() == 0
    # and the store is usable afterwards (no transaction left open)
    assert vstore.submit("miner", [prediction("a")], now=NOW)[0]["status"] == "success"


# ---- MinerStore ----------------------------------------------------------------------------------


def test_add_predictions_pending_per_validator(mstore: MinerStore) -> None:
    added = mstore.add_predictions([prediction("a"), prediction("b", "g2")], ["V1", "V2"])
    assert added == ["a", "b"]
    assert mstore.counts() == {"pending": 4, "confirmed": 0, "rejected": 0}
    assert mstore.counts("V1") == {"pending": 2, "confirmed": 0, "rejected": 0}
    assert mstore.validators() == ["V1", "V2"]
    assert mstore.delivery("a", "V1") == ("pending", None)
    assert mstore.delivery("a", "V3") is None
    assert mstore.predicted_games() == {"g1", "g2"}
    # adding again is harmless: nothing new, and a settled delivery stays settled
    mstore.record_results("V1", [("a", "success", ACCEPTED)])
    assert mstore.add_predictions([prediction("a")], ["V1", "V2"]) == []
    assert mstore.delivery("a", "V1") == ("confirmed", None)
    assert mstore.counts() == {"pending": 3, "confirmed": 1, "rejected": 0}


def test_add_predictions_needs_an_id_and_is_atomic(mstore: MinerStore) -> None:
    with pytest.raises(ValueError):
        mstore.add_predictions([prediction("a"), {"game_id": "g1"}], ["V1"])
    assert mstore.counts() == {"pending": 0, "confirmed": 0, "rejected": 0}
    assert mstore.add_predictions([{"id": "seed", "game_id": "g1", "wager": 1.0}], ["V1"]) == ["seed"]


def test_pending_order_limit_and_exclude(mstore: MinerStore) -> None:
    for i in range(5):
        mstore.add_predictions([prediction(f"p{i}")], ["V1"])
    ids = [p["prediction_id"] for p in mstore.pending("V1", 10)]
    assert ids == ["p0", "p1", "p2", "p3", "p4"]  # oldest first (ties broken by id)
    assert [p["prediction_id"] for p in mstore.pending("V1", 2)] == ["p0", "p1"]
    assert [p["prediction_id"] for p in mstore.pending("V1", 2, exclude=["p0", "p1"])] == ["p2", "p3"]
    assert [p["prediction_id"] for p in mstore.pending("V1", 10, exclude=["p1", "p3"])] == ["p0", "p2", "p4"]
    assert mstore.pending("V1", 3, exclude=["p0", "p1", "p2", "p3", "p4"]) == []
    assert mstore.pending("V2", 10) == []
    # bodies come back exactly as stored
    assert mstore.pending("V1", 1)[0] == prediction("p0")
    mstore.record_results("V1", [("p0", "success", ACCEPTED), ("p2", "error", UNKNOWN_GAME)])
    assert [p["prediction_id"] for p in mstore.pending("V1", 10)] == ["p1", "p3", "p4"]


def test_pending_orders_by_creation_time(mstore: MinerStore) -> None:
    mstore.add_predictions([prediction("z-first")], ["V1"])
    mstore.db.execute("UPDATE predictions SET created_at='2000-01-01T00:00:00+00:00'")
    mstore.add_predictions([prediction("a-second")], ["V1"])
    assert [p["prediction_id"] for p in mstore.pending("V1", 10)] == ["z-first", "a-second"]


def test_record_results_only_changes_pending(mstore: MinerStore) -> None:
    mstore.add_predictions([prediction("a"), prediction("b"), prediction("c")], ["V1", "V2"])
    changed = mstore.record_results(
        "V1", [("a", "success", ACCEPTED), ("b", "error", GAME_STARTED), ("unknown", "success", ACCEPTED)]
    )
    assert changed == 2
    assert mstore.delivery("a", "V1") == ("confirmed", None)
    assert mstore.delivery("b", "V1") == ("rejected", GAME_STARTED)
    assert mstore.delivery("a", "V2") == ("pending", None)
    # late duplicate answers cannot flip a settled delivery
    assert mstore.record_results("V1", [("a", "error", "late"), ("b", "success", ACCEPTED)]) == 0
    assert mstore.delivery("a", "V1") == ("confirmed", None)
    assert mstore.delivery("b", "V1") == ("rejected", GAME_STARTED)
    assert mstore.latest_rejections() == [("b", "V1", GAME_STARTED)]


def test_counts_per_validator(mstore: MinerStore) -> None:
    mstore.add_predictions([prediction(f"p{i}") for i in range(4)], ["V1", "V2", "V3"])
    mstore.record_results("V1", [("p0", "success", ""), ("p1", "success", ""), ("p2", "error", "x")])
    mstore.record_results("V2", [("p3", "error", "y")])
    assert mstore.counts("V1") == {"pending": 1, "confirmed": 2, "rejected": 1}
    assert mstore.counts("V2") == {"pending": 3, "confirmed": 0, "rejected": 1}
    assert mstore.counts("V3") == {"pending": 4, "confirmed": 0, "rejected": 0}
    assert mstore.counts("V4") == {"pending": 0, "confirmed": 0, "rejected": 0}
    assert mstore.counts() == {"pending": 8, "confirmed": 2, "rejected": 2}


def test_wagered_today(mstore: MinerStore) -> None:
    """Counted by each prediction's own date, as the validator counts it; per validator too."""
    today = datetime.now(UTC).isoformat()
    mstore.add_predictions([prediction("a", wager=2.5, prediction_date=today)], ["V1"])
    mstore.add_predictions([prediction("b", wager=1.5, prediction_date=today)], ["V1", "V2"])
    mstore.add_predictions([prediction("old", wager=100.0, prediction_date=today)], ["V1"])
    mstore.db.execute("UPDATE predictions SET created_at='2000-01-01T00:00:00+00:00' WHERE prediction_id='old'")
    # made yesterday (dated so): not today's budget
    yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    mstore.add_predictions([prediction("y", wager=50.0, prediction_date=yesterday)], ["V1"])
    assert mstore.wagered_today() == 4.0
    assert mstore.wagered_today("V1") == 4.0
    assert mstore.wagered_today("V2") == 1.5


async def test_db_thread_runs_calls_one_at_a_time(mstore: MinerStore) -> None:
    db = DbThread()
    active = 0
    peak = 0

    def work(i: int) -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        mstore.add_predictions([prediction(f"p{i}")], ["V1"])
        active -= 1
        return i

    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await db.run(work, i))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
    assert sorted(results) == list(range(20))
    assert peak == 1
    assert mstore.counts("V1")["pending"] == 20


# ---- the property: any interleaving of duplicated and resent predictions -------------------------

GAMES = [game("g1"), game("g2", can_tie=False), game("started", starts=NOW - timedelta(minutes=5))]


@st.composite
def prediction_sets(draw: st.DrawFn) -> list[tuple[str, dict[str, Any], bool]]:
    """(miner, prediction, valid) triples; the valid ones of a miner stay within the daily limit."""
    count = draw(st.integers(1, 8))
    items = []
    budget = {"m1": 1000.0, "m2": 1000.0}
    for i in range(count):
        miner = draw(st.sampled_from(["m1", "m2"]))
        kind = draw(
            st.sampled_from(["valid", "valid", "unknown", "started", "outcome", "wager", "missing"])
        )
        wager = float(draw(st.integers(1, 1000)))
        data = prediction(f"{miner}-p{i}", draw(st.sampled_from(["g1", "g2"])), wager=wager)
        valid = False
        if kind == "valid":
            if wager <= budget[miner]:
                budget[miner] -= wager
                valid = True
            else:
                data["predicted_outcome"] = "Nobody"  # invalid whatever the order
        elif kind == "unknown":
            data["game_id"] = "nope"
        elif kind == "started":
            data["game_id"] = "started"
        elif kind == "outcome":
            data["predicted_outcome"] = "Tie" if data["game_id"] == "g2" else "Nobody"
        elif kind == "wager":
            data["wager"] = draw(st.sampled_from([0, -1.0, "abc", True]))
        elif kind == "missing":
            del data[draw(st.sampled_from(["game_id", "predicted_outcome", "wager"]))]
        items.append((miner, data, valid))
    return items


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[tuple[str, dict[str, Any], bool]], list[tuple[str, list[int]]]]:
    items = draw(prediction_sets())
    # every prediction at least once, some again (resends), in any order, in messages of 1..4
    order = list(range(len(items))) + draw(st.lists(st.integers(0, len(items) - 1), max_size=12))
    order = draw(st.permutations(order))
    messages: list[tuple[str, list[int]]] = []
    pos = 0
    while pos < len(order):
        size = draw(st.integers(1, 4))
        chunk = order[pos : pos + size]
        pos += size
        # a message comes from one miner: split a chunk by miner, keeping the order
        for miner, group in itertools.groupby(chunk, key=lambda i: items[i][0]):
            messages.append((miner, list(group)))
    return items, messages


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_any_interleaving_stores_each_once_and_answers_agree(
    scenario: tuple[list[tuple[str, dict[str, Any], bool]], list[tuple[str, list[int]]]],
) -> None:
    items, messages = scenario
    with tempfile.TemporaryDirectory() as tmp:
        store = ValidatorStore(Path(tmp) / "v.db")
        try:
            store.upsert_games(GAMES)
            answers: dict[str, set[tuple[str, str]]] = {}
            for miner, indices in messages:
                batch = [dict(items[i][1]) for i in indices]
                results = store.submit(miner, batch, now=NOW)
                assert len(results) == len(batch)
                for i, result in zip(indices, results, strict=True):
                    pid = items[i][1]["prediction_id"]
                    assert result["prediction_id"] == pid
                    answers.setdefault(pid, set()).add((result["status"], result["message"]))
            valid = {data["prediction_id"]: miner for miner, data, ok in items if ok}
            # each valid prediction stored exactly once, by its miner; nothing else stored
            rows = store.db.execute("SELECT prediction_id, miner_hotkey FROM predictions").fetchall()
            assert sorted(r[0] for r in rows) == sorted(valid)
            assert {r[0]: r[1] for r in rows} == valid
            # all answers for one prediction agree, but after a refusal that can heal
            # ("game unknown": judged again, it may meet another rule first); success
            # exactly for the valid ones
            for _, data, ok in items:
                pid = data["prediction_id"]
                final = {a for a in answers[pid] if a[1] not in HEALABLE}
                assert len(final) <= 1, (pid, answers[pid])
                statuses = {status for status, _ in answers[pid]}
                assert statuses == ({"success"} if ok else {"error"}), (pid, answers[pid])
        finally:
            store.close()
