"""ValidatorStore's in-memory game caches stay bounded and never answer from a stale entry.

Any miner can name any game id, so what the store remembers about unknown ids must
not grow with what miners send (UNKNOWN_GAME_CACHE_SIZE), and a game stored after
its id was looked up and found unknown must be accepted from then on.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bettensor_ws.node import store as store_module
from bettensor_ws.node.rules import MISSING_DATA, UNKNOWN_GAME
from bettensor_ws.node.store import ValidatorStore
from tests.helpers import make_game

# Read from the module at use, so that every behavioural test here still runs (and
# fails where it should) against a store without these names.
UNKNOWN_GAME_CACHE_SIZE: int = getattr(store_module, "UNKNOWN_GAME_CACHE_SIZE", 4_096)
KNOWN_GAME_CACHE_SIZE: int = getattr(store_module, "KNOWN_GAME_CACHE_SIZE", 4_096)

ACCEPTED = ValidatorStore.ACCEPTED
MINER = "5miner"


def prediction(pid: str, game_id: Any, wager: float = 1.0) -> dict[str, Any]:
    """A prediction on the home side of ``make_game(n)`` for any n: acceptable when the game is."""
    return {
        "prediction_id": pid,
        "game_id": game_id,
        "miner_uid": "1",
        "predicted_outcome": "Home0",
        "wager": wager,
        "confidence_score": None,
    }


def answers(results: list[Any]) -> list[tuple[Any, str, str]]:
    return [(r["prediction_id"], r["status"], r["message"]) for r in results]


def unknown_ids_cached(store: ValidatorStore) -> int:
    return len(store._unknown_games)


def known_games_cached(store: ValidatorStore) -> int:
    return len(store._known_games)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ValidatorStore]:
    store = ValidatorStore(tmp_path / "validator.db")
    store.upsert_games([make_game(0)])  # "game-0", team_a "Home0"
    yield store
    store.close()


def test_bounds_are_documented_constants() -> None:
    assert store_module.UNKNOWN_GAME_CACHE_SIZE == 4_096
    assert store_module.KNOWN_GAME_CACHE_SIZE == 4_096
    assert "UNKNOWN_GAME_CACHE_SIZE" in store_module.__all__


def test_20000_distinct_unknown_games_leave_at_most_the_bound(store: ValidatorStore) -> None:
    total, chunk = 20_000, 2_000
    for start in range(0, total, chunk):
        batch = [prediction(f"p{i}", f"nowhere-{i}", wager=0.01) for i in range(start, start + chunk)]
        results = store.submit(MINER, batch)
        assert {r["message"] for r in results} == {UNKNOWN_GAME}
        assert unknown_ids_cached(store) <= UNKNOWN_GAME_CACHE_SIZE
    assert unknown_ids_cached(store) == UNKNOWN_GAME_CACHE_SIZE  # full, not cleared
    assert known_games_cached(store) <= KNOWN_GAME_CACHE_SIZE
    # "game unknown" can heal, so none of these is recorded; the store still answers right
    assert store.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 0
    assert answers(store.submit(MINER, [prediction("real", "game-0")])) == [("real", "success", ACCEPTED)]
    evicted, recent = "nowhere-0", f"nowhere-{total - 1}"
    assert answers(store.submit(MINER, [prediction("old", evicted), prediction("new", recent)])) == [
        ("old", "error", UNKNOWN_GAME),
        ("new", "error", UNKNOWN_GAME),
    ]


def test_memory_held_does_not_grow_with_distinct_unknown_games(store: ValidatorStore) -> None:
    """Whatever the caches are called: 12,000 more unknown ids retain no more memory."""

    def flood(first: int, count: int) -> None:
        for start in range(first, first + count, 1_000):
            store.submit(MINER, [prediction(f"m{i}", f"nowhere-{i}") for i in range(start, start + 1_000)])

    tracemalloc.start()
    try:
        flood(0, 8_000)  # well past the bound: a bounded cache is full, its table grown
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        flood(8_000, 12_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # an id cached for ever costs ~80 bytes (key and slot): unbounded, this grows ~1 MB
    assert grown < 300_000, f"{grown} bytes retained by 12,000 unknown game ids"


def test_a_flood_of_unknown_ids_does_not_push_out_the_known_games(store: ValidatorStore) -> None:
    store.submit(MINER, [prediction("real", "game-0")])
    assert known_games_cached(store) == 1
    store.submit(MINER, [prediction(f"p{i}", f"nowhere-{i}") for i in range(2 * UNKNOWN_GAME_CACHE_SIZE)])
    assert known_games_cached(store) == 1
    assert "game-0" in store._known_games


def test_known_games_are_bounded_too(store: ValidatorStore) -> None:
    count = KNOWN_GAME_CACHE_SIZE + 100
    store.upsert_games([make_game(n) for n in range(1, count + 1)])
    # one tiny wager on each game's home side (team_a is Home{n})
    batch = [
        {**prediction(f"p{n}", f"game-{n}", wager=0.1), "predicted_outcome": f"Home{n}"}
        for n in range(1, count + 1)
    ]
    results = store.submit(MINER, batch)
    assert {r["status"] for r in results} == {"success"}
    assert known_games_cached(store) == KNOWN_GAME_CACHE_SIZE


def test_a_game_unknown_then_upserted_is_accepted(store: ValidatorStore) -> None:
    late = make_game(7, prefix="late")  # "late-7", team_a "Home7"
    first = store.submit(MINER, [{**prediction("early", "late-7"), "predicted_outcome": "Home7"}])
    assert answers(first) == [("early", "error", UNKNOWN_GAME)]
    assert unknown_ids_cached(store) == 1

    assert store.upsert_games([late]) == ["late-7"]
    after = store.submit(MINER, [{**prediction("later", "late-7"), "predicted_outcome": "Home7"}])
    assert answers(after) == [("later", "success", ACCEPTED)]
    # "game unknown" can heal: resent now, the refused prediction is accepted
    assert answers(store.submit(MINER, [{**prediction("early", "late-7"), "predicted_outcome": "Home7"}])) == [
        ("early", "success", ACCEPTED)
    ]


def test_a_game_unknown_evicted_and_named_again_then_upserted_is_accepted(store: ValidatorStore) -> None:
    store.submit(MINER, [prediction("first", "late-7")])
    store.submit(MINER, [prediction(f"p{i}", f"nowhere-{i}") for i in range(UNKNOWN_GAME_CACHE_SIZE)])
    assert "late-7" not in store._unknown_games  # evicted
    store.submit(MINER, [prediction("second", "late-7")])
    assert "late-7" in store._unknown_games  # looked up and cached again
    store.upsert_games([make_game(7, prefix="late")])
    assert answers(store.submit(MINER, [{**prediction("third", "late-7"), "predicted_outcome": "Home7"}])) == [
        ("third", "success", ACCEPTED)
    ]


def test_a_game_written_by_another_connection_is_accepted_once_upserted_here(tmp_path: Path) -> None:
    """upsert_games finds the row unchanged (already on disk) and must still drop the stale entry."""
    path = tmp_path / "shared.db"
    store, other = ValidatorStore(path), ValidatorStore(path)
    try:
        late = make_game(7, prefix="late")
        pick = {**prediction("a", "late-7"), "predicted_outcome": "Home7"}
        assert answers(store.submit(MINER, [pick])) == [("a", "error", UNKNOWN_GAME)]
        other.upsert_games([late])
        assert store.upsert_games([late]) == []  # nothing changed on disk
        assert answers(store.submit(MINER, [{**pick, "prediction_id": "b"}])) == [("b", "success", ACCEPTED)]
    finally:
        store.close()
        other.close()


def test_a_missing_game_id_does_not_hide_a_game_named_none(store: ValidatorStore) -> None:
    store.upsert_games([{**make_game(0), "game_id": "None"}])
    missing = store.submit(MINER, [prediction("no-game", None)])
    assert answers(missing) == [("no-game", "error", MISSING_DATA)]
    named = store.submit(MINER, [prediction("named", "None")])
    assert answers(named) == [("named", "success", ACCEPTED)]
